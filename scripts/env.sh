# Sourced by the scripts that run cargo: Rust installed by rustup but not yet on this shell's
# PATH (a fresh install, a non-login shell) is found all the same.
if ! command -v cargo >/dev/null && [ -r "${CARGO_HOME:-$HOME/.cargo}/env" ]; then
  . "${CARGO_HOME:-$HOME/.cargo}/env"
fi

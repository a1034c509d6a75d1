//! `cartridge serve`: an OpenAI-compatible chat server whose requests may name cartridges,
//! `"cartridges": [{"id": "ns/name@version"}, …]` (the shape Tokasaurus takes on
//! `/v1/cartridge/chat/completions`, a route served too). They go in front of the conversation,
//! composed in request order. The loader, in this process, fetches them from the registry on
//! first use, verifies them, keeps them on disk and their decoded keys and values in memory for
//! the next request. The model answers one request at a time; the others wait in a queue.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytesize::ByteSize;
use cartridge_client::PullOptions;
use cartridge_loader::buffer::ShmDir;
use cartridge_loader::device::{Device, Location};
use cartridge_loader::disk::DiskCache;
use cartridge_loader::error::LoaderError;
use cartridge_loader::resolve::Resolver;
use cartridge_loader::{LoadRequest, LoadResponse, Loader, LoaderOptions};
use cartridge_schemas::paths::Paths;
use cartridge_schemas::{Digest, ModelFingerprint};
use cartridge_trainer::cartridge::prefix_of_layers;
use cartridge_trainer::model::{
    GenerationRequest, Llama, LoadedModel, Message, ModelSource, Prefix, Sampling, TextCodec,
    generate_streaming,
};
use clap::Args;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::RegistryArgs;
use super::train::{DeviceKind, positive};

/// Serve a model over HTTP with OpenAI's chat completions API (`POST /v1/chat/completions`,
/// `GET /v1/models`), a request's `cartridges` in front of its conversation.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The model: a GGUF file, a Hugging Face checkpoint directory or an installed alias.
    #[arg(long)]
    pub model: String,
    /// The model's name in requests and answers (default: --model as given).
    #[arg(long)]
    pub served_name: Option<String>,
    /// Address to listen on (port 0: any free port; the address is printed).
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Listen on an address other machines reach (the API has no authentication).
    #[arg(long)]
    pub allow_remote: bool,
    /// Where the model runs (`cuda` needs a build with `--features cuda`).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceKind,
    /// Longest answer a request may ask for, in tokens, and the length of one that names none.
    #[arg(long, default_value_t = 1024, value_parser = positive)]
    pub max_tokens: usize,
    /// Requests that may wait for the model; more are refused (503) until some are answered.
    #[arg(long, default_value_t = 64, value_parser = positive)]
    pub queue: usize,
    /// Where fetched cartridges are kept (default: `loader/` in the cache).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Disk kept for fetched cartridges; the least recently used go first.
    #[arg(long, default_value = "20GiB")]
    pub disk_cap: ByteSize,
    /// Memory kept for decoded cartridges between requests; the least recently used go first.
    #[arg(long, default_value = "8GiB")]
    pub memory: ByteSize,
    /// Where decoded cartridges are kept in memory (default: /dev/shm).
    #[arg(long)]
    pub shm_dir: Option<PathBuf>,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// Larger bodies are refused: a conversation fills the model's positions long before this.
const BODY_LIMIT: usize = 4 << 20;
/// Most answers one request may ask for (`n`).
const MOST_CHOICES: usize = 16;
/// Most stop strings one request may give, as OpenAI's API allows.
const MOST_STOPS: usize = 4;
/// How long running requests may go on after a signal to stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long a load's handle lives: a request holds it while it waits for the model, and one
/// whose release was lost is not kept for good.
const LEASE_SECONDS: u64 = 3600;

pub fn run(args: ServeArgs) -> Result<()> {
    if !args.listen.ip().is_loopback() && !args.allow_remote {
        bail!(
            "--listen {} is reachable from other machines, and the API has no authentication: listen on loopback, or pass --allow-remote",
            args.listen
        );
    }
    // Bound first: a port in use is told before the model loads.
    let listener = std::net::TcpListener::bind(args.listen)
        .with_context(|| format!("binding {}", args.listen))?;
    listener.set_nonblocking(true)?;
    let paths = Paths::from_env()?;
    let (device, dtype) = args.device.open()?;
    let LoadedModel {
        llama,
        text,
        fingerprint,
    } = ModelSource::resolve(&args.model, &paths.models())?
        .load(&device, dtype)
        .with_context(|| format!("loading {}", args.model))?;
    let runtime = super::runtime()?;
    let _guard = runtime.enter();
    // Without a registry the server still answers; requests naming cartridges are refused.
    let (loader, _shm) = match args.registry.connect(None) {
        Ok(client) => {
            let cache_dir = args
                .cache_dir
                .clone()
                .unwrap_or_else(|| paths.cache.join("loader"));
            let resolver = Resolver::new(client, &cache_dir, Duration::from_secs(5))?;
            let disk = DiskCache::open(&cache_dir, args.disk_cap.as_u64())
                .with_context(|| format!("opening {}", cache_dir.display()))?;
            let shm = ShmDir::create_in(args.shm_dir.clone())?;
            let options = LoaderOptions {
                device: Arc::new(Device::host(shm.path())),
                transfers: PullOptions::default(),
                default_lease: None,
            };
            let loader = Loader::new(resolver, disk, args.memory.as_u64(), options);
            (Ok(Arc::new(loader)), Some(shm))
        }
        Err(error) => {
            let why = format!("{error:#}");
            eprintln!("{why}: requests that name cartridges are refused");
            (Err(why), None)
        }
    };
    let text = Arc::new(text);
    let (jobs, queue) = std::sync::mpsc::channel();
    let max_positions = llama.config.max_positions;
    let worker_text = Arc::clone(&text);
    std::thread::Builder::new()
        .name("model".into())
        .spawn(move || work(&llama, &worker_text, &queue))
        .context("starting the model's thread")?;
    let server = Arc::new(Server {
        name: args.served_name.unwrap_or(args.model),
        text,
        fingerprint,
        max_positions,
        max_tokens: args.max_tokens,
        queue: args.queue,
        // The request being answered, and those waiting.
        admission: Arc::new(Semaphore::new(
            args.queue.min(Semaphore::MAX_PERMITS - 1) + 1,
        )),
        loader,
        jobs,
    });
    let listener = tokio::net::TcpListener::from_std(listener)?;
    runtime.block_on(listen(server, listener))
}

async fn listen(server: Arc<Server>, listener: tokio::net::TcpListener) -> Result<()> {
    eprintln!(
        "serving {} ({} positions); ask it at POST /v1/chat/completions",
        server.name, server.max_positions
    );
    println!("listening on http://{}", listener.local_addr()?);
    let completions = post(completions).fallback(wrong_method);
    let router = Router::new()
        .route("/v1/chat/completions", completions.clone())
        .route("/v1/cartridge/chat/completions", completions)
        .route("/v1/models", get(models).fallback(wrong_method))
        .fallback(|uri: Uri| async move {
            ApiError::new(StatusCode::NOT_FOUND, format!("no such endpoint: {uri}"))
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(server);
    let (signalled, mut stopping) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = async { match terminate.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending().await,
            } } => {},
        }
        signalled.send_replace(true);
    };
    let grace = async move {
        let _ = stopping.wait_for(|stopping| *stopping).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        served = axum::serve(listener, router).with_graceful_shutdown(shutdown) => {
            served.context("serving")
        }
        () = grace => {
            eprintln!(
                "requests still running {} s after the signal: stopping",
                SHUTDOWN_GRACE.as_secs()
            );
            Ok(())
        }
    }
}

async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{uri} does not take {method}"),
    )
}

struct Server {
    name: String,
    text: Arc<TextCodec>,
    fingerprint: ModelFingerprint,
    max_positions: usize,
    max_tokens: usize,
    queue: usize,
    /// A permit per request taken in, held until it is answered: what waits (its cartridges
    /// held in memory) is bounded before anything is loaded.
    admission: Arc<Semaphore>,
    /// The loader, or why there is none.
    loader: std::result::Result<Arc<Loader>, String>,
    jobs: std::sync::mpsc::Sender<Job>,
}

/// An error in the shape of OpenAI's API: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    /// The request's field at fault.
    param: Option<String>,
    code: Option<Value>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// A bad value of the request's field `param`.
    fn bad(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_owned()),
            ..Self::new(StatusCode::BAD_REQUEST, message)
        }
    }

    fn internal(message: impl std::fmt::Display) -> Self {
        tracing::error!(%message, "request failed");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message.to_string())
    }

    fn body(&self) -> Value {
        let kind = match self.status.is_client_error() {
            true => "invalid_request_error",
            false => "server_error",
        };
        json!({"error": {
            "message": self.message, "type": kind, "param": self.param, "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        // OpenAI's clients retry a 409 (another model's cartridge), which answers the same
        // every time; they heed this.
        if self.status.is_client_error() {
            response
                .headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("false"));
        }
        response
    }
}

impl From<LoaderError> for ApiError {
    fn from(error: LoaderError) -> Self {
        let code = error.code();
        let status =
            StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!(%error, "loading cartridges failed");
        }
        Self {
            status,
            message: error.to_string(),
            param: status.is_client_error().then(|| "cartridges".to_owned()),
            code: serde_json::to_value(code).ok(),
        }
    }
}

/// A body field named `name`, if given (`null` is not given): a value of the wrong shape is
/// told by the field's name.
fn take<T: DeserializeOwned>(
    body: &mut Map<String, Value>,
    name: &str,
) -> Result<Option<T>, ApiError> {
    match body.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => serde_json::from_value(value)
            .map(Some)
            .map_err(|e| ApiError::bad(name, format!("{name}: {e}"))),
    }
}

/// Options of OpenAI's API that do not change an answer.
const HARMLESS: &[&str] = &[
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "prompt_cache_key",
    "safety_identifier",
];

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Whether an option's value asks for nothing: its default, or none.
fn asks_nothing(value: &Value) -> bool {
    match value {
        Value::Null | Value::Bool(false) => true,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s == "auto" || s == "none",
        // `modalities`' default is text alone.
        Value::Array(items) => items.is_empty() || *items == [json!("text")],
        Value::Object(fields) => {
            fields.is_empty() || fields.get("type").and_then(Value::as_str) == Some("text")
        }
        Value::Bool(true) => false,
    }
}

/// A request checked, ready to render and load.
struct Asked {
    messages: Vec<Message>,
    cartridges: Vec<String>,
    /// The answer's length asked for, and the field that asked.
    requested_tokens: Option<(usize, &'static str)>,
    sampling: Sampling,
    choices: usize,
    stops: Vec<String>,
    seed: Option<u64>,
    stream: bool,
    include_usage: bool,
}

/// Reads a chat completion request's body field by field.
fn check(server: &Server, mut body: Map<String, Value>) -> Result<Asked, ApiError> {
    let model: Option<String> = take(&mut body, "model")?;
    let messages = body.remove("messages").unwrap_or(Value::Null);
    let cartridges = body.remove("cartridges");
    let max_tokens: Option<usize> = take(&mut body, "max_tokens")?;
    let max_completion_tokens: Option<usize> = take(&mut body, "max_completion_tokens")?;
    let temperature: Option<f64> = take(&mut body, "temperature")?;
    let top_p: Option<f64> = take(&mut body, "top_p")?;
    let n: Option<usize> = take(&mut body, "n")?;
    let stop = body.remove("stop");
    let seed: Option<i64> = take(&mut body, "seed")?;
    let stream: Option<bool> = take(&mut body, "stream")?;
    let stream_options: Option<StreamOptions> = take(&mut body, "stream_options")?;
    if let Some(model) = &model
        && *model != server.name
    {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            code: Some(json!("model_not_found")),
            ..ApiError::bad(
                "model",
                format!(
                    "the model {model:?} is not served here; this server serves {:?}",
                    server.name
                ),
            )
        });
    }
    // Everything else is refused unless it asks for nothing or cannot change an answer, so an
    // option this server does not offer is never ignored.
    if let Some((option, _)) = body
        .iter()
        .find(|(key, value)| !HARMLESS.contains(&key.as_str()) && !asks_nothing(value))
    {
        return Err(ApiError::bad(
            option,
            format!("{option} is not supported by this server"),
        ));
    }
    let messages = read_messages(messages)?;
    let choices = n.unwrap_or(1);
    if !(1..=MOST_CHOICES).contains(&choices) {
        return Err(ApiError::bad(
            "n",
            format!("n is {choices}: expected 1 to {MOST_CHOICES}"),
        ));
    }
    let temperature = temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
        return Err(ApiError::bad(
            "temperature",
            format!("temperature is {temperature}: expected 0 to 2"),
        ));
    }
    let top_p = top_p.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&top_p) {
        return Err(ApiError::bad(
            "top_p",
            format!("top_p is {top_p}: expected 0 to 1"),
        ));
    }
    // No probability to draw from: the most likely token, as OpenAI's API reads it.
    let sampling = match top_p == 0.0 {
        true => Sampling::GREEDY,
        false => Sampling { temperature, top_p },
    };
    let stops = read_stops(stop)?;
    let requested_tokens = match (max_completion_tokens, max_tokens) {
        (Some(tokens), _) => Some((tokens, "max_completion_tokens")),
        (None, Some(tokens)) => Some((tokens, "max_tokens")),
        (None, None) => None,
    };
    match requested_tokens {
        Some((0, field)) => {
            return Err(ApiError::bad(
                field,
                format!("{field} is 0: expected at least 1"),
            ));
        }
        Some((tokens, field)) if tokens > server.max_tokens => {
            return Err(ApiError::bad(
                field,
                format!(
                    "{field} is {tokens}, over this server's limit of {} (its --max-tokens)",
                    server.max_tokens
                ),
            ));
        }
        _ => {}
    }
    Ok(Asked {
        messages,
        cartridges: read_cartridges(cartridges)?,
        requested_tokens,
        sampling,
        choices,
        stops,
        // Any 64 bits do; OpenAI's API takes a signed integer.
        seed: seed.map(|seed| seed as u64),
        stream: stream.unwrap_or(false),
        include_usage: stream_options.is_some_and(|o| o.include_usage),
    })
}

/// The conversation: system (or developer), user and assistant turns of text, the user's last.
fn read_messages(messages: Value) -> Result<Vec<Message>, ApiError> {
    let bad = |message: String| ApiError::bad("messages", message);
    let messages = match messages {
        Value::Array(messages) => messages,
        Value::Null => return Err(bad("there are no messages".into())),
        _ => return Err(bad("messages is not a list of messages".into())),
    };
    if messages.is_empty() {
        return Err(bad("messages is empty: there is nothing to answer".into()));
    }
    let messages = messages
        .into_iter()
        .enumerate()
        .map(|(i, message)| {
            let role = match message.get("role").and_then(Value::as_str) {
                // OpenAI's newer name for the system role.
                Some("system" | "developer") => "system",
                Some(role @ ("user" | "assistant")) => role,
                Some(other) => {
                    return Err(bad(format!(
                        "messages[{i}]: the role {other:?} is not supported (system, developer, user or assistant)"
                    )));
                }
                None => return Err(bad(format!("messages[{i}] has no role"))),
            };
            let content = match message.get("content") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(text)) => text.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|part| match (part.get("type").and_then(Value::as_str), part.get("text")) {
                        (Some("text"), Some(Value::String(text))) => Ok(text.as_str()),
                        (Some("text"), _) => {
                            Err(bad(format!("messages[{i}]: a text part without its text")))
                        }
                        (kind, _) => Err(bad(format!(
                            "messages[{i}]: content of type {} is not supported (text only)",
                            kind.map_or("(none)".into(), |k| format!("{k:?}"))
                        ))),
                    })
                    .collect::<Result<String, _>>()?,
                Some(_) => {
                    return Err(bad(format!(
                        "messages[{i}].content is neither text nor a list of text parts"
                    )));
                }
            };
            // `name` says who wrote a turn; anything else (`tool_calls`, …) is not offered.
            let other = message.as_object().and_then(|fields| {
                fields.iter().find(|(key, value)| {
                    !["role", "content", "name"].contains(&key.as_str()) && !asks_nothing(value)
                })
            });
            if let Some((key, _)) = other {
                return Err(bad(format!(
                    "messages[{i}].{key} is not supported by this server"
                )));
            }
            Ok(Message::new(role, content))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if messages.last().is_some_and(|m| m.role != "user") {
        return Err(bad(
            "the last message is not the user's: there is no question to answer".into(),
        ));
    }
    Ok(messages)
}

/// `stop`: one string or a list of them.
fn read_stops(stop: Option<Value>) -> Result<Vec<String>, ApiError> {
    let shape = || {
        ApiError::bad(
            "stop",
            format!("stop: expected a string or a list of at most {MOST_STOPS}, none empty"),
        )
    };
    let stops = match stop {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(stop)) => vec![stop],
        Some(Value::Array(stops)) => stops
            .into_iter()
            .map(|stop| match stop {
                Value::String(stop) => Ok(stop),
                _ => Err(shape()),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(shape()),
    };
    if stops.len() > MOST_STOPS || stops.iter().any(String::is_empty) {
        return Err(shape());
    }
    Ok(stops)
}

/// `cartridges`: each `{"id": reference}` (Tokasaurus's shape) or the reference alone.
/// Tokasaurus's `force_redownload` is taken and changes nothing (what is cached is checked
/// against its digest); a `source` other than this server's registry is refused.
fn read_cartridges(cartridges: Option<Value>) -> Result<Vec<String>, ApiError> {
    let bad = |message: String| ApiError::bad("cartridges", message);
    let shape = "each is {\"id\": \"namespace/name@version\"} or the reference alone";
    let items = match cartridges {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(bad(format!("cartridges is not a list: {shape}"))),
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(id) => Ok(id),
            Value::Object(mut fields) => {
                let id = match fields.remove("id") {
                    Some(Value::String(id)) => id,
                    _ => return Err(bad(format!("cartridges[{i}] has no id: {shape}"))),
                };
                match fields.remove("source") {
                    None | Some(Value::Null) => {}
                    Some(source) => {
                        return Err(bad(format!(
                            "cartridges[{i}]: the source {source} is not taken: cartridges come from this server's registry (leave source out)"
                        )));
                    }
                }
                match fields.remove("force_redownload") {
                    None | Some(Value::Bool(_)) => {}
                    Some(_) => return Err(bad(format!("cartridges[{i}].force_redownload is not true or false"))),
                }
                match fields.keys().next() {
                    Some(other) => Err(bad(format!("cartridges[{i}]: the field {other:?} is not taken"))),
                    None => Ok(id),
                }
            }
            _ => Err(bad(format!("cartridges[{i}]: {shape}"))),
        })
        .collect()
}

/// Cartridges composed and resident in the loader, held until their keys and values are
/// read: they count against the loader's memory while the request waits.
struct Loaded {
    response: LoadResponse,
    loader: Arc<Loader>,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        if let Err(error) = self.loader.release(self.response.handle) {
            tracing::warn!(%error, "releasing a load");
        }
    }
}

impl Loaded {
    fn tokens(&self) -> usize {
        self.response.tokens as usize
    }

    /// The keys and values as the model's prefix (a copy: the handle may go after).
    fn prefix(&self, llama: &Llama) -> Result<Prefix> {
        let r = &self.response;
        let bytes = match &r.location {
            Location::Path(path) => {
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?
            }
            Location::Cuda(_) => bail!("the loader answered with GPU memory"),
        };
        let shape = [r.kv_heads as usize, r.tokens as usize, r.head_dim as usize];
        let tensor = shape.iter().product::<usize>() * r.dtype.size();
        let at = |offset: u64| -> Result<&[u8]> {
            usize::try_from(offset)
                .ok()
                .and_then(|start| bytes.get(start..start.checked_add(tensor)?))
                .with_context(|| {
                    format!(
                        "the loader's buffer ({} bytes) ends before its layout",
                        bytes.len()
                    )
                })
        };
        let layers = r
            .layout
            .iter()
            .map(|span| Ok((at(span.keys)?, at(span.values)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(prefix_of_layers(layers.into_iter(), r.dtype, shape, llama)?)
    }
}

/// Loads `cartridges` composed for the server's model, the request's admission held until the
/// load ends (its caller gone or not).
async fn load(
    server: &Server,
    cartridges: Vec<String>,
    admitted: OwnedSemaphorePermit,
) -> Result<(Loaded, OwnedSemaphorePermit), ApiError> {
    let loader = server.loader.as_ref().map_err(|why| {
        ApiError::bad(
            "cartridges",
            format!("this server reaches no registry to fetch cartridges from ({why})"),
        )
    })?;
    let request = LoadRequest {
        model: server.fingerprint.clone(),
        cartridges,
        stream: false,
        lease: Some(LEASE_SECONDS),
    };
    let prepared = loader.prepare(&request).await?;
    // On a task of its own: a load cancelled midway (its caller gone) would strand what it
    // reserved. A handle nobody takes is released as its `Loaded` drops.
    let loader = Arc::clone(loader);
    let (response, admitted) = tokio::spawn(async move {
        let response = loader.load(prepared, None).await;
        (
            response.map(|response| Loaded { response, loader }),
            admitted,
        )
    })
    .await
    .map_err(|e| ApiError::internal(format!("loading the cartridges: {e}")))?;
    Ok((response?, admitted))
}

async fn models(State(server): State<Arc<Server>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": server.name, "object": "model", "created": 0, "owned_by": "cartridge"}],
    }))
}

async fn completions(
    State(server): State<Arc<Server>>,
    body: std::result::Result<Json<Map<String, Value>>, JsonRejection>,
) -> Response {
    respond(&server, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn respond(
    server: &Arc<Server>,
    body: std::result::Result<Json<Map<String, Value>>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is over {}",
                ByteSize::b(BODY_LIMIT as u64)
            ),
        ),
        // As OpenAI's API answers a body it cannot read (axum says 422 for JSON of the wrong
        // shape).
        StatusCode::UNPROCESSABLE_ENTITY => {
            ApiError::new(StatusCode::BAD_REQUEST, rejection.body_text())
        }
        status => ApiError::new(status, rejection.body_text()),
    })?;
    let asked = check(server, body)?;
    let Ok(permit) = Arc::clone(&server.admission).try_acquire_owned() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the server is busy: the model's queue (its --queue, {}) is full; try again later",
                server.queue
            ),
        ));
    };
    // With cartridges, the conversation follows the system turn a cartridge stands for.
    let text = Arc::clone(&server.text);
    let (messages, after_system) = (asked.messages, !asked.cartridges.is_empty());
    let prompt = tokio::task::spawn_blocking(move || match after_system {
        true => text.render_after_system_ids(&messages, true),
        false => text.render_ids(&messages, true),
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|e| ApiError::bad("messages", e.to_string()))?;
    let (loaded, permit) = match asked.cartridges.is_empty() {
        true => (None, permit),
        false => {
            let (loaded, permit) = load(server, asked.cartridges, permit).await?;
            (Some(loaded), permit)
        }
    };
    let cartridge_tokens = loaded.as_ref().map_or(0, Loaded::tokens);
    let limit = server.max_positions;
    let room = limit.saturating_sub(cartridge_tokens + prompt.len());
    if room == 0 {
        return Err(ApiError::bad(
            "messages",
            format!(
                "the conversation ({} tokens) does not fit in the model's {limit} positions after the cartridges' {cartridge_tokens}",
                prompt.len()
            ),
        ));
    }
    let max_tokens = match asked.requested_tokens {
        Some((tokens, field)) if tokens > room => {
            return Err(ApiError::bad(
                field,
                format!(
                    "{field} is {tokens}, but {room} of the model's {limit} positions are left after the cartridges' {cartridge_tokens} and the conversation's {}",
                    prompt.len()
                ),
            ));
        }
        Some((tokens, _)) => tokens,
        None => server.max_tokens.min(room),
    };
    let (updates, answers) = tokio::sync::mpsc::unbounded_channel();
    let reply = Reply {
        id: format!("chatcmpl-{:016x}", rand::random::<u64>()),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: server.name.clone(),
        choices: asked.choices,
        prompt_tokens: prompt.len(),
        cartridge_tokens,
    };
    let job = Job {
        prompt,
        loaded,
        choices: asked.choices,
        max_tokens,
        sampling: asked.sampling,
        seed: asked.seed.unwrap_or_else(rand::random),
        stops: asked.stops,
        stream: asked.stream,
        updates,
        _admitted: permit,
    };
    server
        .jobs
        .send(job)
        .map_err(|_| ApiError::internal("the model stopped"))?;
    match asked.stream {
        true => Ok(stream(reply, answers, asked.include_usage)),
        false => collect(reply, answers).await,
    }
}

/// What every answer to one request shares.
struct Reply {
    id: String,
    created: u64,
    model: String,
    choices: usize,
    prompt_tokens: usize,
    cartridge_tokens: usize,
}

impl Reply {
    fn usage(&self, finished: &Finished) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": finished.completion_tokens,
            "total_tokens": self.prompt_tokens + finished.completion_tokens,
            "cartridge_tokens": self.cartridge_tokens,
        })
    }

    fn chunk(&self, choices: Value, usage: Option<Value>) -> Event {
        let mut chunk = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "choices": choices,
        });
        if let Some(usage) = usage {
            chunk["usage"] = usage;
        }
        Event::default().data(chunk.to_string())
    }
}

async fn collect(
    reply: Reply,
    mut answers: UnboundedReceiver<Update>,
) -> Result<Response, ApiError> {
    while let Some(update) = answers.recv().await {
        let Update::Done(finished) = update else {
            continue;
        };
        let finished = finished.map_err(ApiError::internal)?;
        let choices: Vec<Value> = finished
            .answers
            .iter()
            .enumerate()
            .map(|(index, (content, reason))| {
                json!({
                    "index": index,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": reason,
                })
            })
            .collect();
        let body = json!({
            "id": reply.id, "object": "chat.completion", "created": reply.created,
            "model": reply.model, "choices": choices, "usage": reply.usage(&finished),
        });
        return Ok(Json(body).into_response());
    }
    Err(ApiError::internal("the model stopped before answering"))
}

/// The answer as server-sent events, in the shape of OpenAI's streamed chat completions.
fn stream(reply: Reply, answers: UnboundedReceiver<Update>, include_usage: bool) -> Response {
    let opening: Vec<Value> = (0..reply.choices)
        .map(|index| {
            json!({"index": index, "delta": {"role": "assistant", "content": ""},
                   "finish_reason": null})
        })
        .collect();
    let pending = VecDeque::from([reply.chunk(Value::Array(opening), None)]);
    let state = (reply, answers, pending, false);
    let events = futures::stream::unfold(state, move |mut state| async move {
        let (reply, answers, pending, ended) = &mut state;
        loop {
            if let Some(event) = pending.pop_front() {
                return Some((Ok::<_, Infallible>(event), state));
            }
            if *ended {
                return None;
            }
            match answers.recv().await {
                Some(Update::Delta { index, text }) => pending.push_back(reply.chunk(
                    json!([{"index": index, "delta": {"content": text}, "finish_reason": null}]),
                    None,
                )),
                Some(Update::Done(Ok(finished))) => {
                    let closing: Vec<Value> = finished
                        .answers
                        .iter()
                        .enumerate()
                        .map(|(index, (_, reason))| {
                            json!({"index": index, "delta": {}, "finish_reason": reason})
                        })
                        .collect();
                    pending.push_back(reply.chunk(Value::Array(closing), None));
                    if include_usage {
                        pending.push_back(reply.chunk(json!([]), Some(reply.usage(&finished))));
                    }
                    pending.push_back(Event::default().data("[DONE]"));
                    *ended = true;
                }
                // The answer has begun: the error goes in the stream, as OpenAI's does.
                failed => {
                    let error = ApiError::internal(match failed {
                        Some(Update::Done(Err(error))) => error,
                        _ => "the model stopped before answering".to_owned(),
                    });
                    pending.push_back(Event::default().data(error.body().to_string()));
                    *ended = true;
                }
            }
        }
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// One request for the model's thread.
struct Job {
    prompt: Vec<u32>,
    loaded: Option<Loaded>,
    choices: usize,
    max_tokens: usize,
    sampling: Sampling,
    seed: u64,
    stops: Vec<String>,
    /// Whether the answer is told as it is written, or only once done.
    stream: bool,
    updates: UnboundedSender<Update>,
    /// Given back once the job is dropped: answered, or never to be.
    _admitted: OwnedSemaphorePermit,
}

/// What the model's thread tells a request as it answers.
enum Update {
    /// More text of answer `index`.
    Delta {
        index: usize,
        text: String,
    },
    Done(std::result::Result<Finished, String>),
}

struct Finished {
    /// Per answer, its text and why it ended: `stop` (the model ended it, or a stop string)
    /// or `length`.
    answers: Vec<(String, &'static str)>,
    completion_tokens: usize,
}

/// The model's thread: requests one at a time, in the order they are ready (one whose
/// cartridges are still being fetched is overtaken).
fn work(llama: &Llama, text: &TextCodec, jobs: &Receiver<Job>) {
    let mut recent = None;
    for mut job in jobs.iter() {
        // A request whose caller went away while it waited is not answered.
        if job.updates.is_closed() {
            continue;
        }
        // A panic fails its request, not the server.
        let answered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            answer(llama, text, &mut job, &mut recent)
        }));
        let finished = match answered {
            Ok(finished) => finished.map_err(|e| format!("{e:#}")),
            Err(_) => Err("the model failed (a panic; see the server's log)".to_owned()),
        };
        let _ = job.updates.send(Update::Done(finished));
    }
}

/// The last cartridges made a prefix, by digest, kept for the next request that names the
/// same: most requests to a server name the same few, and this spares copying their keys and
/// values again (on a GPU, to the device).
type Recent = Option<(Vec<Digest>, Prefix)>;

fn answer(llama: &Llama, text: &TextCodec, job: &mut Job, recent: &mut Recent) -> Result<Finished> {
    // Copied out (or found ready), the cartridges are given back to the loader before the
    // answer begins.
    let prefix = match job.loaded.take() {
        None => None,
        Some(loaded) => {
            let parts: Vec<Digest> = loaded.response.parts.iter().map(|p| p.digest).collect();
            match recent {
                Some((kept, prefix)) if *kept == parts => Some(prefix.clone()),
                _ => {
                    // The one kept goes first: two compositions need not fit at once.
                    *recent = None;
                    let prefix = loaded.prefix(llama)?;
                    *recent = Some((parts, prefix.clone()));
                    Some(prefix)
                }
            }
        }
    };
    let request = GenerationRequest {
        prefix: prefix.as_ref(),
        shared: &job.prompt,
        prompts: &vec![Vec::new(); job.choices],
        max_new_tokens: job.max_tokens,
        sampling: job.sampling,
        top_logprobs: None,
        stop_ids: &text.stop_ids,
        stop_on_repeat: 0,
        seed: job.seed,
    };
    let mut answers: Vec<Answer> = (0..job.choices).map(|_| Answer::default()).collect();
    let mut failed = None;
    let generated = generate_streaming(llama, &request, |sequences| {
        // The caller went away: nobody reads the rest.
        if job.updates.is_closed() {
            sequences.iter_mut().for_each(|s| s.stopped = true);
            return;
        }
        for (index, (sequence, answer)) in sequences.iter_mut().zip(&mut answers).enumerate() {
            if answer.ended {
                continue;
            }
            let last = sequence.stopped || sequence.tokens.len() == job.max_tokens;
            // Only a streamed answer, or one a stop string may end, is decoded as it is written.
            if !(job.stream || last || !job.stops.is_empty()) {
                continue;
            }
            match text.answer_text(&sequence.tokens) {
                Ok(written) => {
                    let delta = answer.advance(written, &job.stops, last);
                    if job.stream && !delta.is_empty() {
                        let _ = job.updates.send(Update::Delta { index, text: delta });
                    }
                }
                Err(error) => {
                    failed.get_or_insert(error);
                    answer.ended = true;
                }
            }
            if answer.ended {
                sequence.stopped = true;
            }
        }
    })?;
    if let Some(error) = failed {
        return Err(error.into());
    }
    Ok(Finished {
        completion_tokens: generated.iter().map(|s| s.tokens.len()).sum(),
        answers: generated
            .iter()
            .zip(answers)
            .map(|(sequence, answer)| {
                let stop_token = sequence
                    .tokens
                    .last()
                    .is_some_and(|t| text.stop_ids.contains(t));
                let reason = match answer.stop_string || stop_token {
                    true => "stop",
                    false => "length",
                };
                (answer.text, reason)
            })
            .collect(),
    })
}

/// One answer as far as it has been written, and told.
#[derive(Default)]
struct Answer {
    /// The answer so far (whole once ended), cut at the first stop string.
    text: String,
    told: String,
    ended: bool,
    stop_string: bool,
}

impl Answer {
    /// Takes the whole answer `written` so far (decoded again each time: a token alone may be
    /// half a character, or read otherwise beside its neighbours) and returns what it adds to
    /// what was told. Until the `last` tokens, a half character at the end, and an end that may
    /// begin a stop string, are held back.
    fn advance(&mut self, mut written: String, stops: &[String], last: bool) -> String {
        if let Some(at) = stops.iter().filter_map(|s| written.find(s.as_str())).min() {
            written.truncate(at);
            self.stop_string = true;
        }
        self.ended = last || self.stop_string;
        self.text = written;
        let shown = match self.ended {
            true => self.text.as_str(),
            false => held_back(&self.text, stops),
        };
        // A decoding that no longer continues what was told waits until it does again (the
        // whole text still ends a non-streamed answer).
        let Some(new) = shown.strip_prefix(self.told.as_str()) else {
            if self.ended {
                tracing::warn!(told = %self.told, text = %self.text, "a streamed answer ended unlike its whole text");
            }
            return String::new();
        };
        let new = new.to_owned();
        self.told.push_str(&new);
        new
    }
}

/// `written` short of a last half character and of an end that may begin a stop string.
fn held_back<'a>(written: &'a str, stops: &[String]) -> &'a str {
    let written = written.trim_end_matches('\u{fffd}');
    let cut = stops
        .iter()
        .flat_map(|stop| {
            (1..stop.len())
                .filter(|&k| stop.is_char_boundary(k))
                .map(|k| &stop[..k])
        })
        .filter(|start| written.ends_with(start))
        .map(str::len)
        .max()
        .unwrap_or(0);
    &written[..written.len() - cut]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_end_that_may_begin_a_stop_string_is_held_back() {
        let stops = vec!["END".to_owned(), "\n\n".to_owned(), "é!".to_owned()];
        assert_eq!(held_back("the answer E", &stops), "the answer ");
        assert_eq!(held_back("the answer EN", &stops), "the answer ");
        assert_eq!(held_back("the answer\n", &stops), "the answer");
        assert_eq!(held_back("the answer ENDS", &stops), "the answer ENDS");
        assert_eq!(held_back("café", &stops), "caf");
        assert_eq!(held_back("half \u{fffd}", &stops), "half ");
        assert_eq!(held_back("nothing held", &[]), "nothing held");
    }

    #[test]
    fn an_answer_is_told_up_to_its_first_stop_string() {
        let stops = vec!["Morrow".to_owned()];
        let mut answer = Answer::default();
        let told: Vec<String> = ["Edda", "Edda Mor", "Edda Morr", "Edda Morrow built"]
            .into_iter()
            .map(|written| answer.advance(written.to_owned(), &stops, false))
            .collect();
        assert_eq!(told, ["Edda", " ", "", ""]);
        assert!(answer.ended && answer.stop_string);
        assert_eq!(answer.text, "Edda ");

        // A held-back start of a stop string that goes on otherwise is told; the last tokens
        // tell what was held.
        let mut answer = Answer::default();
        assert_eq!(answer.advance("Mo".to_owned(), &stops, false), "");
        assert_eq!(answer.advance("Most".to_owned(), &stops, false), "Most");
        assert_eq!(answer.advance("Most Mor".to_owned(), &stops, false), " ");
        assert_eq!(answer.advance("Most Mor".to_owned(), &stops, true), "Mor");
        assert!(answer.ended && !answer.stop_string);
        assert_eq!(answer.text, "Most Mor");

        // A decoding that stops continuing what was told waits; the text is the last one.
        let mut answer = Answer::default();
        assert_eq!(answer.advance("ab".to_owned(), &[], false), "ab");
        assert_eq!(answer.advance("xy".to_owned(), &[], false), "");
        assert_eq!(answer.advance("abc".to_owned(), &[], true), "c");
        assert_eq!(answer.text, "abc");
    }

    #[test]
    fn options_that_ask_for_nothing_are_told_from_those_that_ask() {
        for nothing in [
            json!(null),
            json!(false),
            json!(0),
            json!([]),
            json!({}),
            json!("auto"),
            json!(["text"]),
            json!({"type": "text"}),
        ] {
            assert!(asks_nothing(&nothing), "{nothing}");
        }
        for something in [
            json!(true),
            json!(0.5),
            json!([{"type": "function"}]),
            json!("high"),
            json!(["text", "audio"]),
            json!({"type": "json_object"}),
        ] {
            assert!(!asks_nothing(&something), "{something}");
        }
    }
}

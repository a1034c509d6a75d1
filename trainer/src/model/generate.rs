//! Batched generation with a KV cache: many continuations of one shared context (a corpus chunk
//! in self-study, a question in evaluation), each stopping on its own, with temperature/top-p
//! sampling or greedy decoding, optionally recording the top log-probabilities of every token.

use candle_core::{D, DType, Tensor};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use super::Mask;
use super::llama::{Context, Llama, Prefix};
use crate::error::{Error, Result};

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 chooses the most likely token (greedy).
    pub temperature: f64,
    /// Nucleus sampling: draw from the smallest set of tokens holding this much probability.
    pub top_p: f64,
}

impl Sampling {
    pub const GREEDY: Self = Self {
        temperature: 0.0,
        top_p: 1.0,
    };
}

#[derive(Debug, Clone)]
pub struct GenerationRequest<'a> {
    /// A cartridge in front of everything (positions `0..P`).
    pub prefix: Option<&'a Prefix>,
    /// Tokens every sequence starts with (processed once).
    pub shared: &'a [u32],
    /// Each sequence's own tokens after the shared ones.
    pub prompts: &'a [Vec<u32>],
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Record, for every generated token, the most likely tokens' log-probabilities: at most
    /// this many, and no more than needed to cover `keep_mass` of the probability.
    pub top_logprobs: Option<(usize, f32)>,
    pub stop_ids: &'a [u32],
    /// Stop a sequence once its last this-many tokens repeat a stretch it already wrote (a
    /// degenerate loop, which small models fall into under greedy decoding), dropping the
    /// repeat; 0 never does.
    pub stop_on_repeat: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Generated {
    /// The new tokens, the stop token included when one ended the sequence (a repeat that
    /// ended it is not included).
    pub tokens: Vec<u32>,
    /// Per new token, `(token, log-probability)` of the most likely tokens, best first.
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    pub stopped: bool,
}

pub fn generate(model: &Llama, request: &GenerationRequest<'_>) -> Result<Vec<Generated>> {
    generate_streaming(model, request, |_| {})
}

/// [`generate`], telling `step` what every sequence holds after each new token: a person
/// reads an answer as it is written. (A repeat that ends a sequence drops tokens it was told.)
/// `step` may end a sequence by marking it `stopped` (a stop string written, a reader gone);
/// generation ends once every sequence has.
pub fn generate_streaming(
    model: &Llama,
    request: &GenerationRequest<'_>,
    mut step: impl FnMut(&mut [Generated]),
) -> Result<Vec<Generated>> {
    let batch = request.prompts.len();
    if batch == 0 {
        return Ok(Vec::new());
    }
    if request.prompts.iter().any(Vec::is_empty) && request.shared.is_empty() {
        return Err(Error::Data("a sequence has no tokens to continue".into()));
    }
    let device = model.device();
    let dtype = model.dtype();
    let prefix_len = request.prefix.map_or(0, Prefix::tokens);
    let longest = request.prompts.iter().map(Vec::len).max().unwrap_or(0);
    let capacity = prefix_len
        .saturating_add(request.shared.len())
        .saturating_add(longest)
        .saturating_add(request.max_new_tokens);
    if capacity > model.config.max_positions {
        return Err(Error::Data(format!(
            "{capacity} positions exceed the model's {}",
            model.config.max_positions
        )));
    }

    // The prefix and the shared tokens go through the model once, for a batch of one.
    let mut cache = model.new_cache(capacity);
    if let Some(prefix) = request.prefix {
        cache.append_prefix(prefix)?;
    }
    let mut last_shared: Option<Tensor> = None;
    if !request.shared.is_empty() {
        let n = request.shared.len();
        let ids = Tensor::new(request.shared, device)?.unsqueeze(0)?;
        let positions =
            Tensor::arange(prefix_len as u32, (prefix_len + n) as u32, device)?.unsqueeze(0)?;
        let mask = Mask::causal(1, prefix_len, n, device)?;
        let hidden = model.forward(&ids, &positions, &mask, Context::Cache(&mut cache))?;
        last_shared = Some(hidden.narrow(1, n - 1, 1)?);
    }
    let mut cache = cache.expand(batch)?;
    let context = prefix_len + request.shared.len();

    // Each sequence's own tokens, right-padded; padded slots stay masked out from then on.
    let lengths: Vec<usize> = request.prompts.iter().map(Vec::len).collect();
    let mut hidden_last = match (longest, last_shared.clone()) {
        (0, Some(hidden)) => hidden
            .broadcast_as((batch, 1, model.config.hidden))?
            .contiguous()?,
        (0, None) => unreachable!("checked above: something precedes generation"),
        _ => {
            let mut ids = Vec::with_capacity(batch * longest);
            let mut positions = Vec::with_capacity(batch * longest);
            for prompt in request.prompts {
                for j in 0..longest {
                    ids.push(prompt.get(j).copied().unwrap_or(0));
                    positions.push((context + j.min(prompt.len().saturating_sub(1))) as u32);
                }
            }
            let ids = Tensor::from_vec(ids, (batch, longest), device)?;
            let positions = Tensor::from_vec(positions, (batch, longest), device)?;
            let mask = Mask::causal(batch, context, longest, device)?;
            let hidden = model.forward(&ids, &positions, &mask, Context::Cache(&mut cache))?;
            let rows = lengths
                .iter()
                .enumerate()
                .map(|(b, &len)| match len {
                    // No own tokens: continue from the shared context's last token.
                    0 => last_shared
                        .clone()
                        .ok_or_else(|| Error::Data("empty prompt".into())),
                    _ => Ok(hidden.narrow(0, b, 1)?.narrow(1, len - 1, 1)?),
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&rows, 0)?
        }
    };
    // Which cache slots each sequence may attend to.
    let mut visible: Vec<Vec<bool>> = lengths
        .iter()
        .map(|&len| {
            let mut slots = vec![true; context + longest];
            slots[context + len..].fill(false);
            slots
        })
        .collect();

    let mut next_position: Vec<usize> = lengths.iter().map(|&len| context + len).collect();
    // Each sequence draws from its own generator, so rows are chosen side by side and the
    // draws do not depend on which other sequences are still running.
    let mut rngs: Vec<rand::rngs::StdRng> = (0..batch as u64)
        .map(|b| {
            rand::rngs::StdRng::seed_from_u64(request.seed ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        })
        .collect();
    let mut results = vec![Generated::default(); batch];
    for _ in 0..request.max_new_tokens {
        let logits = model
            .logits(&hidden_last)?
            .squeeze(1)?
            .to_dtype(DType::F32)?;
        let log_probabilities =
            candle_nn::ops::log_softmax(&logits, D::Minus1)?.to_vec2::<f32>()?;
        let next: Vec<u32> = log_probabilities
            .par_iter()
            .zip(&mut results)
            .zip(&mut rngs)
            .map(|((row, result), rng)| {
                if result.stopped {
                    // Finished sequences ride along until the batch ends; what they see is
                    // ignored.
                    return 0;
                }
                let token = choose(row, request.sampling, rng);
                if let Some((k, mass)) = request.top_logprobs {
                    result.top_logprobs.push(top_tokens(row, k, mass));
                }
                result.tokens.push(token);
                result.stopped = request.stop_ids.contains(&token);
                if !result.stopped && repeats(&result.tokens, request.stop_on_repeat) {
                    let kept = result.tokens.len() - request.stop_on_repeat;
                    result.tokens.truncate(kept);
                    result.top_logprobs.truncate(kept);
                    result.stopped = true;
                }
                token
            })
            .collect();
        step(&mut results);
        // Done when no sequence would take another token (some may have stopped, others filled).
        if results
            .iter()
            .all(|r| r.stopped || r.tokens.len() == request.max_new_tokens)
        {
            break;
        }
        let slots = cache.len() + 1;
        let mut mask = vec![f32::NEG_INFINITY; batch * slots];
        for (b, v) in visible.iter_mut().enumerate() {
            v.push(true);
            for (j, _) in v.iter().enumerate().filter(|(_, seen)| **seen) {
                mask[b * slots + j] = 0.0;
            }
        }
        let mask = Mask::additive(
            Tensor::from_vec(mask, (batch, 1, 1, 1, slots), device)?.to_dtype(dtype)?,
        );
        let ids = Tensor::from_vec(next, (batch, 1), device)?;
        let positions = Tensor::from_vec(
            next_position.iter().map(|&p| p as u32).collect::<Vec<_>>(),
            (batch, 1),
            device,
        )?;
        next_position.iter_mut().for_each(|p| *p += 1);
        hidden_last = model.forward(&ids, &positions, &mask, Context::Cache(&mut cache))?;
    }
    Ok(results)
}

/// Whether the last `n` (> 0) tokens already occur earlier in `tokens`.
fn repeats(tokens: &[u32], n: usize) -> bool {
    n > 0
        && tokens.len() > n
        && tokens[..tokens.len() - 1]
            .windows(n)
            .any(|window| window == &tokens[tokens.len() - n..])
}

/// Picks a token from a row of log-probabilities.
fn choose(log_probabilities: &[f32], sampling: Sampling, rng: &mut impl Rng) -> u32 {
    if sampling.temperature <= 0.0 {
        return argmax(log_probabilities);
    }
    // Tempered probabilities, most likely first, cut at the nucleus.
    let scale = 1.0 / sampling.temperature as f32;
    let peak = log_probabilities
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    let mut weights: Vec<(u32, f32)> = log_probabilities
        .iter()
        .enumerate()
        .map(|(i, &lp)| (i as u32, ((lp - peak) * scale).exp()))
        .collect();
    let cut = if sampling.top_p >= 1.0 {
        weights.len()
    } else {
        nucleus(&mut weights, sampling.top_p as f32)
    };
    let weights = &weights[..cut];
    let mut draw = rng.random::<f32>() * weights.iter().map(|w| w.1).sum::<f32>();
    for &(token, weight) in weights {
        draw -= weight;
        if draw <= 0.0 {
            return token;
        }
    }
    weights[weights.len() - 1].0
}

/// Puts the most likely weights first, in order, as many as hold `top_p` of the total, and
/// returns how many. A vocabulary's worth is never sorted: the nucleus is found among the
/// largest few (selected in linear time), taking more only while they hold too little.
fn nucleus(weights: &mut [(u32, f32)], top_p: f32) -> usize {
    let wanted = top_p * weights.iter().map(|w| w.1).sum::<f32>();
    let descending = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
    let mut head = 64.min(weights.len());
    loop {
        if head < weights.len() {
            weights.select_nth_unstable_by(head - 1, descending);
        }
        weights[..head].sort_unstable_by(descending);
        let mut kept = 0.0;
        for (index, (_, weight)) in weights[..head].iter().enumerate() {
            kept += weight;
            if kept >= wanted {
                return index + 1;
            }
        }
        if head == weights.len() {
            return head;
        }
        head = (head * 8).min(weights.len());
    }
}

fn argmax(values: &[f32]) -> u32 {
    values
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i as u32)
}

/// The `k` most likely tokens, stopping early once they hold `mass` of the probability.
pub(crate) fn top_tokens(log_probabilities: &[f32], k: usize, mass: f32) -> Vec<(u32, f32)> {
    let mut indexed: Vec<(u32, f32)> = log_probabilities
        .iter()
        .enumerate()
        .map(|(i, &lp)| (i as u32, lp))
        .collect();
    let k = k.clamp(1, indexed.len());
    indexed.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
    indexed.truncate(k);
    indexed.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
    let mut held = 0.0;
    let mut keep = indexed.len();
    for (index, (_, lp)) in indexed.iter().enumerate() {
        held += lp.exp();
        if held >= mass {
            keep = index + 1;
            break;
        }
    }
    indexed.truncate(keep);
    indexed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nucleus is the same set a full sort finds, flat distributions (thousands of tokens
    /// in it) and peaked ones alike.
    #[test]
    fn nucleus_matches_a_full_sort() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (sharpness, top_p) in [(0.1f32, 0.95f32), (0.1, 0.5), (8.0, 0.95), (8.0, 0.9999)] {
            let weights: Vec<(u32, f32)> = (0..49_152)
                .map(|i| (i, (rng.random::<f32>() * sharpness).exp()))
                .collect();
            let mut sorted = weights.clone();
            sorted.sort_by(|a, b| b.1.total_cmp(&a.1));
            let wanted = top_p * weights.iter().map(|w| w.1).sum::<f32>();
            let mut kept = 0.0;
            let expected = sorted
                .iter()
                .position(|w| {
                    kept += w.1;
                    kept >= wanted
                })
                .map_or(sorted.len(), |i| i + 1);
            let mut ours = weights.clone();
            let cut = nucleus(&mut ours, top_p);
            assert_eq!(cut, expected, "sharpness {sharpness}, top_p {top_p}");
            let mut ours: Vec<u32> = ours[..cut].iter().map(|w| w.0).collect();
            let mut theirs: Vec<u32> = sorted[..cut].iter().map(|w| w.0).collect();
            ours.sort_unstable();
            theirs.sort_unstable();
            assert_eq!(ours, theirs);
        }
    }
}

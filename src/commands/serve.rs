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
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, Uri};
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
use cartridge_schemas::ModelFingerprint;
use cartridge_schemas::paths::Paths;
use cartridge_trainer::cartridge::prefix_of_layers;
use cartridge_trainer::model::{
    GenerationRequest, Llama, LoadedModel, Message, ModelSource, Prefix, Sampling, TextCodec,
    generate_streaming,
};
use clap::Args;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

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
/// How long a load's handle lives: the keys and values are copied out at once, and a handle
/// a failed request left behind is not kept for good.
const LEASE_SECONDS: u64 = 300;

pub fn run(args: ServeArgs) -> Result<()> {
    if !args.listen.ip().is_loopback() && !args.allow_remote {
        bail!(
            "--listen {} is reachable from other machines, and the API has no authentication: listen on loopback, or pass --allow-remote",
            args.listen
        );
    }
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
            (Ok(loader), Some(shm))
        }
        Err(error) => {
            let why = format!("{error:#}");
            eprintln!("{why}: requests that name cartridges are refused");
            (Err(why), None)
        }
    };
    let text = Arc::new(text);
    let (jobs, queue) = std::sync::mpsc::sync_channel(args.queue);
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
        loader,
        jobs,
    });
    runtime.block_on(listen(server, args.listen))
}

async fn listen(server: Arc<Server>, address: SocketAddr) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("binding {address}"))?;
    eprintln!(
        "serving {} ({} positions); ask it at POST /v1/chat/completions",
        server.name, server.max_positions
    );
    println!("listening on http://{}", listener.local_addr()?);
    let router = Router::new()
        .route("/v1/chat/completions", post(completions))
        .route("/v1/cartridge/chat/completions", post(completions))
        .route("/v1/models", get(models))
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

struct Server {
    name: String,
    text: Arc<TextCodec>,
    fingerprint: ModelFingerprint,
    max_positions: usize,
    max_tokens: usize,
    queue: usize,
    /// The loader, or why there is none.
    loader: std::result::Result<Loader, String>,
    jobs: SyncSender<Job>,
}

/// An error in the shape of OpenAI's API: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    code: Option<Value>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            code: None,
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn internal(message: impl std::fmt::Display) -> Self {
        tracing::error!(%message, "request failed");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message.to_string())
    }

    fn body(&self) -> Value {
        let kind = match self.status.as_u16() {
            404 => "not_found_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        json!({"error": {
            "message": self.message, "type": kind, "param": null, "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
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
            code: serde_json::to_value(code).ok(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: Option<String>,
    messages: Vec<ChatMessage>,
    #[serde(default, deserialize_with = "cartridge_ids")]
    cartridges: Vec<String>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    n: Option<usize>,
    stop: Option<Stop>,
    seed: Option<u64>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    /// Everything else: options no answer here could honour are refused (`UNSUPPORTED`),
    /// the rest (`user`, `metadata`, …) do not change an answer.
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

/// Options of OpenAI's API that change an answer in ways this server does not offer.
const UNSUPPORTED: &[&str] = &[
    "logprobs",
    "top_logprobs",
    "tools",
    "functions",
    "response_format",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "audio",
    "modalities",
    "prediction",
];

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

/// Each cartridge as `{"id": reference}` (Tokasaurus's shape) or the reference alone. What
/// else Tokasaurus takes (`source`: where to download from) is refused: cartridges come from
/// this server's registry.
fn cartridge_ids<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<Vec<String>, D::Error> {
    use serde::de::Error;
    let shape = "each as {\"id\": \"namespace/name@version\"} or the reference alone";
    Vec::<Value>::deserialize(deserializer)?
        .into_iter()
        .map(|item| match item {
            Value::String(id) => Ok(id),
            Value::Object(mut fields) => match (fields.remove("id"), fields.keys().next()) {
                (_, Some(other)) => Err(D::Error::custom(format!(
                    "the field {other:?} is not taken: cartridges come from this server's registry, {shape}"
                ))),
                (Some(Value::String(id)), None) => Ok(id),
                _ => Err(D::Error::custom(format!("a cartridge is named {shape}"))),
            },
            _ => Err(D::Error::custom(format!("a cartridge is named {shape}"))),
        })
        .collect()
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Whether an option's value is its default (asks for nothing).
fn is_default(value: &Value) -> bool {
    match value {
        Value::Null | Value::Bool(false) => true,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::Array(items) => items.is_empty(),
        Value::Object(fields) => {
            fields.is_empty() || fields.get("type").and_then(Value::as_str) == Some("text")
        }
        Value::String(_) | Value::Bool(true) => false,
    }
}

/// A request checked and rendered, ready for the model.
struct Asked {
    messages: Vec<Message>,
    cartridges: Vec<String>,
    requested_tokens: Option<usize>,
    sampling: Sampling,
    choices: usize,
    stops: Vec<String>,
    seed: Option<u64>,
    stream: bool,
    include_usage: bool,
}

fn check(server: &Server, request: ChatRequest) -> Result<Asked, ApiError> {
    if let Some(model) = &request.model
        && *model != server.name
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "the model {model:?} is not served here; this server serves {:?}",
                server.name
            ),
        ));
    }
    if let Some((option, _)) = request
        .rest
        .iter()
        .find(|(key, value)| UNSUPPORTED.contains(&key.as_str()) && !is_default(value))
    {
        return Err(ApiError::bad(format!(
            "{option} is not supported by this server"
        )));
    }
    if request.messages.is_empty() {
        return Err(ApiError::bad(
            "messages is empty: there is nothing to answer",
        ));
    }
    let messages = request
        .messages
        .into_iter()
        .enumerate()
        .map(|(i, message)| {
            let role = match message.role.as_str() {
                // OpenAI's newer name for the system role.
                "system" | "developer" => "system",
                role @ ("user" | "assistant") => role,
                other => {
                    return Err(ApiError::bad(format!(
                        "messages[{i}]: the role {other:?} is not supported (system, user or assistant)"
                    )));
                }
            };
            let content = match message.content {
                None => String::new(),
                Some(Content::Text(text)) => text,
                Some(Content::Parts(parts)) => parts
                    .into_iter()
                    .map(|part| match (part.kind.as_str(), part.text) {
                        ("text", Some(text)) => Ok(text),
                        (kind, _) => Err(ApiError::bad(format!(
                            "messages[{i}]: content of type {kind:?} is not supported (text only)"
                        ))),
                    })
                    .collect::<Result<String, _>>()?,
            };
            Ok(Message::new(role, content))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if messages.last().is_some_and(|m| m.role != "user") {
        return Err(ApiError::bad(
            "the last message is not the user's: there is no question to answer",
        ));
    }
    let choices = request.n.unwrap_or(1);
    if !(1..=MOST_CHOICES).contains(&choices) {
        return Err(ApiError::bad(format!(
            "n is {choices}: expected 1 to {MOST_CHOICES}"
        )));
    }
    let temperature = request.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
        return Err(ApiError::bad(format!(
            "temperature is {temperature}: expected 0 to 2"
        )));
    }
    let top_p = request.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad(format!(
            "top_p is {top_p}: expected above 0, at most 1"
        )));
    }
    let stops = match request.stop {
        None => Vec::new(),
        Some(Stop::One(stop)) => vec![stop],
        Some(Stop::Many(stops)) => stops,
    };
    if stops.len() > MOST_STOPS || stops.iter().any(String::is_empty) {
        return Err(ApiError::bad(format!(
            "stop: expected at most {MOST_STOPS} strings, none empty"
        )));
    }
    let requested_tokens = request.max_completion_tokens.or(request.max_tokens);
    match requested_tokens {
        Some(0) => return Err(ApiError::bad("max_tokens is 0: expected at least 1")),
        Some(tokens) if tokens > server.max_tokens => {
            return Err(ApiError::bad(format!(
                "max_tokens is {tokens}, over this server's limit of {} (its --max-tokens)",
                server.max_tokens
            )));
        }
        _ => {}
    }
    Ok(Asked {
        messages,
        cartridges: request.cartridges,
        requested_tokens,
        sampling: Sampling { temperature, top_p },
        choices,
        stops,
        seed: request.seed,
        stream: request.stream,
        include_usage: request.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// Cartridges composed by the loader: where each layer's keys and values are in `bytes`.
struct Loaded {
    response: LoadResponse,
    bytes: Vec<u8>,
}

impl Loaded {
    fn tokens(&self) -> usize {
        self.response.tokens as usize
    }

    fn prefix(&self, llama: &Llama) -> Result<Prefix> {
        let r = &self.response;
        let shape = [r.kv_heads as usize, r.tokens as usize, r.head_dim as usize];
        let tensor = shape.iter().product::<usize>() * r.dtype.size();
        let at = |offset: u64| -> Result<&[u8]> {
            usize::try_from(offset)
                .ok()
                .and_then(|start| self.bytes.get(start..start.checked_add(tensor)?))
                .with_context(|| {
                    format!(
                        "the loader's buffer ({} bytes) ends before its layout",
                        self.bytes.len()
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

/// Loads `cartridges` composed for the server's model and copies their keys and values out.
async fn load(server: &Server, cartridges: Vec<String>) -> Result<Loaded, ApiError> {
    let loader = server.loader.as_ref().map_err(|why| {
        ApiError::bad(format!(
            "this server reaches no registry to fetch cartridges from ({why})"
        ))
    })?;
    let request = LoadRequest {
        model: server.fingerprint.clone(),
        cartridges,
        stream: false,
        lease: Some(LEASE_SECONDS),
    };
    let prepared = loader.prepare(&request).await?;
    let response = loader.load(prepared, None).await?;
    let read = match &response.location {
        Location::Path(path) => tokio::fs::read(path)
            .await
            .map_err(|e| ApiError::internal(format!("reading {}: {e}", path.display()))),
        Location::Cuda(_) => Err(ApiError::internal("the loader answered with GPU memory")),
    };
    // Copied out (or not): the handle is not needed any more.
    if let Err(error) = loader.release(response.handle) {
        tracing::warn!(%error, "releasing a load");
    }
    Ok(Loaded {
        response,
        bytes: read?,
    })
}

async fn models(State(server): State<Arc<Server>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": server.name, "object": "model", "created": 0, "owned_by": "cartridge"}],
    }))
}

async fn completions(
    State(server): State<Arc<Server>>,
    body: std::result::Result<Json<ChatRequest>, JsonRejection>,
) -> Response {
    respond(&server, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn respond(
    server: &Arc<Server>,
    body: std::result::Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(request) = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is over {}",
                ByteSize::b(BODY_LIMIT as u64)
            ),
        ),
        // As OpenAI's API answers a body it cannot read (axum says 422 for a JSON of the
        // wrong shape).
        StatusCode::UNPROCESSABLE_ENTITY => ApiError::bad(rejection.body_text()),
        status => ApiError::new(status, rejection.body_text()),
    })?;
    let asked = check(server, request)?;
    // With cartridges, the conversation follows the system turn a cartridge stands for.
    let prompt = match asked.cartridges.is_empty() {
        true => server.text.render_ids(&asked.messages, true),
        false => server.text.render_after_system_ids(&asked.messages, true),
    }
    .map_err(|e| ApiError::bad(e.to_string()))?;
    let loaded = match asked.cartridges.is_empty() {
        true => None,
        false => Some(load(server, asked.cartridges).await?),
    };
    let cartridge_tokens = loaded.as_ref().map_or(0, Loaded::tokens);
    let limit = server.max_positions;
    let room = limit.saturating_sub(cartridge_tokens + prompt.len());
    if room == 0 {
        return Err(ApiError::bad(format!(
            "the conversation ({} tokens) does not fit in the model's {limit} positions after the cartridges' {cartridge_tokens}",
            prompt.len()
        )));
    }
    let max_tokens = match asked.requested_tokens {
        Some(tokens) if tokens > room => {
            return Err(ApiError::bad(format!(
                "max_tokens is {tokens}, but {room} of the model's {limit} positions are left after the cartridges' {cartridge_tokens} and the conversation's {}",
                prompt.len()
            )));
        }
        Some(tokens) => tokens,
        None => server.max_tokens.min(room),
    };
    let (updates, answers) = tokio::sync::mpsc::unbounded_channel();
    let prompt_tokens = prompt.len();
    let job = Job {
        prompt,
        loaded,
        choices: asked.choices,
        max_tokens,
        sampling: asked.sampling,
        seed: asked.seed.unwrap_or_else(rand::random),
        stops: asked.stops,
        updates,
    };
    match server.jobs.try_send(job) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the server is busy: {} requests are waiting for the model (its --queue); try again later",
                    server.queue
                ),
            ));
        }
        Err(TrySendError::Disconnected(_)) => return Err(ApiError::internal("the model stopped")),
    }
    let reply = Reply {
        id: format!("chatcmpl-{:016x}", rand::random::<u64>()),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: server.name.clone(),
        choices: asked.choices,
        prompt_tokens,
        cartridge_tokens,
    };
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
    let mut contents = vec![String::new(); reply.choices];
    while let Some(update) = answers.recv().await {
        let finished = match update {
            Update::Delta { index, text } => {
                contents[index].push_str(&text);
                continue;
            }
            Update::Done(finished) => finished.map_err(ApiError::internal)?,
        };
        let choices: Vec<Value> = contents
            .into_iter()
            .zip(&finished.reasons)
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
                        .reasons
                        .iter()
                        .enumerate()
                        .map(|(index, reason)| {
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
                Some(Update::Done(Err(error))) => {
                    let error = ApiError::internal(error);
                    pending.push_back(Event::default().data(error.body().to_string()));
                    *ended = true;
                }
                None => {
                    let error = ApiError::internal("the model stopped before answering");
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
    updates: UnboundedSender<Update>,
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
    /// Per answer, `stop` (the model ended it, or a stop string) or `length`.
    reasons: Vec<&'static str>,
    completion_tokens: usize,
}

/// The model's thread: requests one at a time, in the order they came.
fn work(llama: &Llama, text: &TextCodec, jobs: &Receiver<Job>) {
    for job in jobs.iter() {
        // A request whose caller went away while it waited is not answered.
        if job.updates.is_closed() {
            continue;
        }
        let finished = answer(llama, text, &job).map_err(|e| format!("{e:#}"));
        let _ = job.updates.send(Update::Done(finished));
    }
}

fn answer(llama: &Llama, text: &TextCodec, job: &Job) -> Result<Finished> {
    let prefix = job.loaded.as_ref().map(|l| l.prefix(llama)).transpose()?;
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
            match answer.advance(text, &sequence.tokens, &job.stops, last) {
                Ok(delta) if !delta.is_empty() => {
                    let _ = job.updates.send(Update::Delta { index, text: delta });
                }
                Ok(_) => {}
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
        reasons: generated
            .iter()
            .zip(&answers)
            .map(|(sequence, answer)| {
                let stop_token = sequence
                    .tokens
                    .last()
                    .is_some_and(|t| text.stop_ids.contains(t));
                match answer.stop_string || stop_token {
                    true => "stop",
                    false => "length",
                }
            })
            .collect(),
        completion_tokens: generated.iter().map(|s| s.tokens.len()).sum(),
    })
}

/// One answer as far as it has been told.
#[derive(Default)]
struct Answer {
    told: String,
    ended: bool,
    stop_string: bool,
}

impl Answer {
    /// The text `tokens` add to what was told. The whole answer is decoded again each time (a
    /// token alone may be half a character, or read otherwise beside its neighbours) and cut
    /// at the first stop string; until the `last` tokens, a half character at the end, and an
    /// end that may begin a stop string, are held back.
    fn advance(
        &mut self,
        text: &TextCodec,
        tokens: &[u32],
        stops: &[String],
        last: bool,
    ) -> cartridge_trainer::Result<String> {
        let kept: Vec<u32> = tokens
            .iter()
            .copied()
            .filter(|t| !text.stop_ids.contains(t))
            .collect();
        let mut written = text.decode(&kept)?;
        if let Some(at) = stops.iter().filter_map(|s| written.find(s.as_str())).min() {
            written.truncate(at);
            self.stop_string = true;
        }
        self.ended = last || self.stop_string;
        let shown = match self.ended {
            true => written.as_str(),
            false => held_back(&written, stops),
        };
        // A decoding that no longer continues what was told waits until it does again.
        let Some(new) = shown.strip_prefix(self.told.as_str()) else {
            return Ok(String::new());
        };
        let new = new.to_owned();
        self.told.push_str(&new);
        Ok(new)
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
        let stops = vec!["END".to_owned(), "\n\n".to_owned()];
        assert_eq!(held_back("the answer E", &stops), "the answer ");
        assert_eq!(held_back("the answer EN", &stops), "the answer ");
        assert_eq!(held_back("the answer\n", &stops), "the answer");
        assert_eq!(held_back("the answer ENDS", &stops), "the answer ENDS");
        assert_eq!(held_back("half \u{fffd}", &stops), "half ");
        assert_eq!(held_back("nothing held", &[]), "nothing held");
    }

    #[test]
    fn options_at_their_defaults_ask_for_nothing() {
        for default in [json!(null), json!(false), json!(0), json!([]), json!({})] {
            assert!(is_default(&default), "{default}");
        }
        assert!(is_default(&json!({"type": "text"})));
        for set in [
            json!(true),
            json!(0.5),
            json!([{"type": "function"}]),
            json!("auto"),
        ] {
            assert!(!is_default(&set), "{set}");
        }
        assert!(!is_default(&json!({"type": "json_object"})));
    }
}

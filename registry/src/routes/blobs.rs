use axum::Json;
use axum::body::Body;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cartridge_schemas::api::{
    ErrorCode, MissingBlobsRequest, MissingBlobsResponse, UploadRequest, UploadResponse,
    UploadTarget,
};
use futures::StreamExt;
use object_store::GetResultPayload;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use crate::AppState;
use crate::auth::Action;
use crate::error::ApiError;
use crate::extract::{Caller, Params, Unread, query_param};
use crate::storage::{BlobWriter, Key, UploadDestination, parse_range, resolve_range};
use object_store::GetRange;

/// The most digests one request may ask about (a cartridge has one chunk per few layers).
const MAX_DIGESTS: usize = 10_000;

/// `POST /v1/repos/{ns}/{name}/blobs/missing`: which of these blobs must be uploaded.
pub async fn missing(
    State(state): State<AppState>,
    caller: Caller,
    params: Params,
    body: Unread,
) -> Result<Json<MissingBlobsResponse>, ApiError> {
    let repo = params.repository()?;
    state.authorize(&caller, &repo, Action::Push).await?;
    let request: MissingBlobsRequest = body.json().await?;
    if request.digests.len() > MAX_DIGESTS {
        return Err(ApiError::new(
            ErrorCode::TooLarge,
            format!("at most {MAX_DIGESTS} digests per request"),
        ));
    }
    Ok(Json(MissingBlobsResponse {
        missing: state.storage.missing_blobs(&repo, &request.digests).await?,
    }))
}

/// `POST /v1/repos/{ns}/{name}/blobs/uploads`: where to send each blob — straight to object
/// storage when it presigns (bytes never pass through the registry, e.g. in Lambda), otherwise
/// to this registry.
pub async fn uploads(
    State(state): State<AppState>,
    caller: Caller,
    params: Params,
    body: Unread,
) -> Result<Json<UploadResponse>, ApiError> {
    let repo = params.repository()?;
    state.authorize(&caller, &repo, Action::Push).await?;
    let request: UploadRequest = body.json().await?;
    if request.blobs.len() > MAX_DIGESTS {
        return Err(ApiError::new(
            ErrorCode::TooLarge,
            format!("at most {MAX_DIGESTS} blobs per request"),
        ));
    }
    let mut uploads = Vec::with_capacity(request.blobs.len());
    for blob in request.blobs {
        if blob.size > state.limits.max_blob_bytes {
            return Err(ApiError::new(
                ErrorCode::TooLarge,
                format!(
                    "blob {} has {} bytes, over the {} byte limit",
                    blob.digest, blob.size, state.limits.max_blob_bytes
                ),
            ));
        }
        let own = format!("/v1/repos/{repo}/blobs/{}", blob.digest.hex());
        uploads.push(
            match state
                .storage
                .upload_destination(&repo, &blob.digest)
                .await?
            {
                UploadDestination::Registry => UploadTarget {
                    digest: blob.digest,
                    url: own,
                    commit_url: None,
                },
                UploadDestination::Presigned { url, id } => UploadTarget {
                    digest: blob.digest,
                    url: url.to_string(),
                    commit_url: Some(format!("{own}/commit?upload={id}")),
                },
            },
        );
    }
    Ok(Json(UploadResponse { uploads }))
}

/// `PUT /v1/repos/{ns}/{name}/blobs/{digest}`: the bytes of one blob, hashed as they arrive and
/// stored only if they match the digest.
pub async fn upload(
    State(state): State<AppState>,
    caller: Caller,
    params: Params,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let repo = params.repository()?;
    let digest = params.digest()?;
    state.authorize(&caller, &repo, Action::Push).await?;
    let limit = state.limits.max_blob_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(ApiError::new(
            ErrorCode::TooLarge,
            format!("blob {digest} is over the {limit} byte limit"),
        ));
    }
    let limits = state.limits;
    let waiters = &state.upload_waiters;
    let turn = {
        // Counted while waiting, however the wait ends (a dropped request included).
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        waiters.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(waiters);
        tokio::time::timeout(limits.upload_wait, state.uploads.acquire()).await
    };
    let _turn = turn
        .map_err(|_| {
            ApiError::new(
                ErrorCode::Unavailable,
                format!(
                    "all {} upload slots stayed busy for {} s; retry later",
                    limits.max_concurrent_uploads,
                    limits.upload_wait.as_secs()
                ),
            )
        })?
        .map_err(|_| ApiError::new(ErrorCode::Unavailable, "shutting down"))?;
    let mut writer = BlobWriter::new(digest, limit);
    let mut stream = body.into_data_stream();
    // An upload holds one of few slots: one that stops sending, or sends too slowly while
    // others wait, gives it up (503: the client may retry, as after any broken link).
    let dropped = |why: String| {
        ApiError::new(
            ErrorCode::Unavailable,
            format!("upload of {digest} dropped: {why}"),
        )
    };
    let started = std::time::Instant::now();
    let mut received = 0u64;
    while let Some(piece) = tokio::time::timeout(limits.upload_stall, stream.next())
        .await
        .map_err(|_| {
            dropped(format!(
                "no data for {} s",
                limits.upload_stall.as_secs_f64()
            ))
        })?
    {
        let piece = piece
            .map_err(|e| ApiError::bad_request(format!("upload of {digest} broke off: {e}")))?;
        received += piece.len() as u64;
        writer.append(piece)?;
        let elapsed = started.elapsed();
        if elapsed > limits.upload_stall
            && waiters.load(Ordering::Relaxed) > 0
            && (received as f64) < limits.min_upload_rate as f64 * elapsed.as_secs_f64()
        {
            return Err(dropped(format!(
                "{received} bytes in {} s, under {} bytes/s while other uploads wait",
                elapsed.as_secs(),
                limits.min_upload_rate
            )));
        }
    }
    let blob = writer.finish()?;
    crate::metrics::blob_bytes("in", blob.len());
    state.storage.put_blob(&repo, blob).await?;
    Ok(StatusCode::CREATED)
}

/// `POST /v1/repos/{ns}/{name}/blobs/{digest}/commit?upload=ID`: verify a direct upload and make
/// it the blob.
pub async fn commit(
    State(state): State<AppState>,
    caller: Caller,
    params: Params,
    RawQuery(query): RawQuery,
) -> Result<StatusCode, ApiError> {
    let repo = params.repository()?;
    let digest = params.digest()?;
    state.authorize(&caller, &repo, Action::Push).await?;
    // Read after the authorization: a caller without a token hears that first.
    let upload = query_param(query.as_deref(), "upload").unwrap_or_default();
    // The id becomes part of an object key: only the hex ids this registry hands out pass.
    if upload.len() != 32
        || !upload
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return Err(ApiError::bad_request(
            "upload id must be 32 lowercase hex characters",
        ));
    }
    state
        .storage
        .commit_upload(&repo, &digest, &upload, state.limits.max_blob_bytes)
        .await?;
    Ok(StatusCode::CREATED)
}

/// `GET /v1/repos/{ns}/{name}/blobs/{digest}`, with HTTP Range. On object stores that presign,
/// a redirect to the object itself. `HEAD` answers the headers from the blob's metadata, on every
/// store, without opening the object.
pub async fn download(
    State(state): State<AppState>,
    caller: Caller,
    params: Params,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let repo = params.repository()?;
    let digest = params.digest()?;
    state.authorize(&caller, &repo, Action::Pull).await?;
    // Content is stored once, but read only through a repository it was sent to.
    let linked = state.storage.exists(Key::BlobLink(&repo, &digest)).await?;
    let Some(meta) = state.storage.blob_meta(&digest).await?.filter(|_| linked) else {
        return Err(ApiError::not_found(format!(
            "blob {digest} not found in {repo}"
        )));
    };
    // A presigned URL is signed for GET alone (a HEAD sent after it is refused): HEAD is
    // answered here, from the metadata.
    if method != Method::HEAD
        && let Some(url) = state.storage.blob_download_url(&digest).await?
    {
        return Ok((
            StatusCode::TEMPORARY_REDIRECT,
            [(header::LOCATION, url.to_string())],
        )
            .into_response());
    }
    let requested = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_range);
    let partial = requested.is_some();
    let range = match requested.map(|range| resolve_range(&range, meta.size)) {
        Some(Some(range)) => Some(range),
        Some(None) => {
            // With the size, as HTTP asks, so a client can ask again within it.
            let mut response = ApiError::new(
                ErrorCode::RangeNotSatisfiable,
                format!(
                    "blob {digest} has {} bytes; the range is outside it",
                    meta.size
                ),
            )
            .into_response();
            response.headers_mut().insert(
                header::CONTENT_RANGE,
                format!("bytes */{}", meta.size)
                    .parse()
                    .expect("digits and ASCII"),
            );
            return Ok(response);
        }
        None => None,
    };
    let total = meta.size;
    let served = range.clone().unwrap_or(0..total);
    let mut response_headers = HeaderMap::new();
    response_headers.insert(
        header::CONTENT_TYPE,
        "application/octet-stream".parse().expect("static"),
    );
    response_headers.insert(header::ACCEPT_RANGES, "bytes".parse().expect("static"));
    response_headers.insert(header::CONTENT_LENGTH, (served.end - served.start).into());
    response_headers.insert(
        header::ETAG,
        format!("\"{}\"", digest.hex())
            .parse()
            .expect("hex is a valid header"),
    );
    let status = if partial {
        let value = format!(
            "bytes {}-{}/{total}",
            served.start,
            served.end.saturating_sub(1)
        );
        response_headers.insert(
            header::CONTENT_RANGE,
            value.parse().expect("numbers are a valid header"),
        );
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    if method == Method::HEAD {
        return Ok((status, response_headers).into_response());
    }
    let result = state
        .storage
        .get_blob(&digest, range.map(GetRange::Bounded))
        .await?;
    let body = match result.payload {
        // object_store streams files in 8 KiB reads, one blocking task each; large reads keep a
        // loopback pull from being bound by task switches.
        GetResultPayload::File(file, _) => {
            let mut file = tokio::fs::File::from_std(file);
            file.seek(std::io::SeekFrom::Start(served.start))
                .await
                .map_err(|e| {
                    ApiError::new(
                        ErrorCode::Unavailable,
                        format!("reading blob {digest}: {e}"),
                    )
                })?;
            let reader = file.take(served.end - served.start);
            Body::from_stream(counted(ReaderStream::with_capacity(reader, 256 << 10)))
        }
        GetResultPayload::Stream(stream) => Body::from_stream(counted(stream)),
    };
    Ok((status, response_headers, body).into_response())
}

/// Counts the bytes a download stream yields.
fn counted<E, S: futures::Stream<Item = Result<bytes::Bytes, E>>>(
    stream: S,
) -> impl futures::Stream<Item = Result<bytes::Bytes, E>> {
    stream.inspect(|piece| {
        if let Ok(piece) = piece {
            crate::metrics::blob_bytes("out", piece.len() as u64);
        }
    })
}

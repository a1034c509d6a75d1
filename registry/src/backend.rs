//! Opening storage from a URL: `file://DIR` (the default), `s3://bucket/prefix` (AWS or any
//! S3-compatible endpoint, configured by the usual AWS_* variables), `memory://` (tests).

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use object_store::ClientConfigKey;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::prefix::PrefixStore;

use crate::storage::Storage;

pub fn open(url: &str) -> Result<Storage> {
    open_with(url, &[])
}

/// Like [`open`], with S3 settings (`aws_endpoint`, `aws_allow_http`, …) given explicitly on top
/// of the environment's.
pub fn open_with(url: &str, s3_options: &[(&str, &str)]) -> Result<Storage> {
    if let Some(dir) = url.strip_prefix("file://") {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating storage directory {dir}"))?;
        let dir = std::fs::canonicalize(dir).with_context(|| format!("storage directory {dir}"))?;
        // Removing empty directories keeps deleted repositories and tags from lingering in
        // listings. A write is on disk before it is acknowledged, as on S3: after a power loss,
        // a version or tag pointer left empty would refuse every later read or write of its name.
        let store = LocalFileSystem::new_with_prefix(&dir)?
            .with_automatic_cleanup(true)
            .with_fsync(true);
        return Ok(Storage::new(
            Arc::new(store),
            format!("file://{}", dir.display()),
        ));
    }
    if url == "memory://" {
        return Ok(Storage::new(Arc::new(InMemory::new()), "memory://"));
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            bail!("storage URL {url:?} names no bucket: expected s3://bucket[/prefix]");
        }
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        for (key, value) in s3_options {
            builder = builder.with_config(
                key.parse()
                    .with_context(|| format!("unknown S3 setting {key}"))?,
                *value,
            );
        }
        check_s3_settings(&builder)?;
        let s3 = Arc::new(
            builder
                .build()
                .with_context(|| format!("configuring S3 for {url}"))?,
        );
        let prefix = Path::from(prefix.trim_matches('/'));
        let store: Arc<dyn object_store::ObjectStore> = if prefix.as_ref().is_empty() {
            s3.clone()
        } else {
            Arc::new(PrefixStore::new(s3.clone(), prefix.clone()))
        };
        return Ok(Storage::new(store, url.to_owned()).with_signer(s3, prefix));
    }
    bail!("unsupported storage URL {url:?}: expected file://DIR, s3://bucket[/prefix] or memory://")
}

/// Settings the S3 client would take silently and fail on later, minutes in or with an error
/// naming something else.
fn check_s3_settings(builder: &AmazonS3Builder) -> Result<()> {
    let get = |key: AmazonS3ConfigKey| builder.get_config_value(&key);
    // As object_store reads a flag.
    let truthy = |value: Option<String>| {
        value.is_some_and(|v| ["true", "1", "on", "yes", "y"].contains(&v.to_lowercase().as_str()))
    };
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    // The client reads keys, web identity, ECS and instance metadata, not the AWS CLI's
    // profiles: with a profile named and nothing else, only an instance role can answer (and
    // where there is none, it waits on the metadata endpoint for minutes).
    let other_source = get(AmazonS3ConfigKey::AccessKeyId).is_some()
        || truthy(get(AmazonS3ConfigKey::SkipSignature))
        || set("AWS_WEB_IDENTITY_TOKEN_FILE")
        || set("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
        || set("AWS_CONTAINER_CREDENTIALS_FULL_URI");
    if set("AWS_PROFILE") && !other_source {
        tracing::warn!(
            "AWS_PROFILE is set, but profiles are not read: credentials come from the instance role, if any; elsewhere export the profile's keys (`eval \"$(aws configure export-credentials --format env)\"`)"
        );
    }
    if let Some(endpoint) = get(AmazonS3ConfigKey::Endpoint)
        && endpoint.starts_with("http://")
        && !truthy(get(AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp)))
    {
        bail!("the S3 endpoint {endpoint} is plain HTTP: set AWS_ALLOW_HTTP=true to allow it");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain-HTTP endpoint is taken only when allowed, in any spelling object_store takes.
    #[test]
    fn plain_http_endpoints_need_allowing() {
        let builder = |allow: Option<&str>| {
            let builder = AmazonS3Builder::new()
                .with_bucket_name("b")
                .with_endpoint("http://127.0.0.1:9");
            match allow {
                Some(value) => builder
                    .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp), value),
                None => builder,
            }
        };
        let error = check_s3_settings(&builder(None)).unwrap_err().to_string();
        assert!(error.contains("set AWS_ALLOW_HTTP=true"), "{error}");
        for allowed in ["true", "1", "YES"] {
            check_s3_settings(&builder(Some(allowed))).unwrap();
        }
    }
}

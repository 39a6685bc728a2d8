//! Hugging Face hub ids as model paths.
//!
//! `model.path = "HuggingFaceTB/SmolLM2-135M-Instruct"` (or `org/name@revision`) resolves to a
//! snapshot directory in the standard Hugging Face cache, the same one Python's `huggingface_hub`
//! uses, so a model downloaded by either is reused by the other:
//!
//! ```text
//! $HF_HUB_CACHE (default $HF_HOME/hub, default ~/.cache/huggingface/hub)
//! └── models--{org}--{name}/
//!     ├── refs/{revision}                 the commit hash the revision pointed at
//!     ├── blobs/{etag}                    file contents (sha256 for LFS files)
//!     ├── snapshots/{commit}/{file}       symlinks to ../../blobs/{etag} (copies if links fail)
//!     └── .no_exist/{commit}/{file}       empty markers: optional files the repo does not have
//! ```
//!
//! A snapshot that already holds the files graft needs is used without any network access;
//! `HF_HUB_OFFLINE=1` forbids the network entirely. Otherwise the missing files are fetched from
//! `{HF_ENDPOINT}/{repo}/resolve/{revision}/{file}` (feature `hub`, on by default), sending
//! `Authorization: Bearer $HF_TOKEN` (or the token saved by `huggingface-cli login`).

use graft_model::error::ModelError;
use graft_model::weights::{LoadedModel, load_model};
use std::path::{Path, PathBuf};

/// Files every graft model needs.
const REQUIRED_FILES: &[&str] = &["config.json", "tokenizer.json", "tokenizer_config.json"];
/// Files fetched when the repo has them; a 404 is fine.
#[cfg_attr(not(feature = "hub"), allow(dead_code))]
const OPTIONAL_FILES: &[&str] = &[
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];
/// Single-file weights.
const SINGLE_WEIGHTS: &str = "model.safetensors";
/// Index of sharded weights.
const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// A parsed hub id: `org/name` with an optional `@revision` (default `main`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    /// `org/name`.
    pub repo: String,
    /// A branch, tag or commit hash.
    pub revision: String,
}

impl HubId {
    /// Parses `org/name` or `org/name@revision`; `None` when `spec` does not look like a hub id
    /// (a path with `./`, `/`, `~`, more than one `/`, a file extension graft reads, odd characters).
    pub fn parse(spec: &str) -> Option<HubId> {
        let (repo, revision) = match spec.split_once('@') {
            Some((repo, rev)) => (repo, rev),
            None => (spec, "main"),
        };
        let (org, name) = repo.split_once('/')?;
        if !valid_repo_part(org) || !valid_repo_part(name) {
            return None;
        }
        let lower = name.to_ascii_lowercase();
        if [".bin", ".gguf", ".safetensors", ".json"]
            .iter()
            .any(|ext| lower.ends_with(ext))
        {
            return None;
        }
        let rev_ok = !revision.is_empty()
            && revision.len() <= 256
            && revision
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
            && revision
                .split('/')
                .all(|part| !part.is_empty() && part != "." && part != "..");
        if !rev_ok {
            return None;
        }
        Some(HubId {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }

    /// The repo's folder in the cache: `models--{org}--{name}`.
    pub fn cache_folder_name(&self) -> String {
        format!("models--{}", self.repo.replace('/', "--"))
    }
}

/// One half of a repo id: 1–96 of `[A-Za-z0-9._-]`, not starting or ending with `.` or `-`, no
/// `--` or `..` (the hub's own rules).
fn valid_repo_part(part: &str) -> bool {
    !part.is_empty()
        && part.len() <= 96
        && part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !part.starts_with(['.', '-'])
        && !part.ends_with(['.', '-'])
        && !part.contains("--")
        && !part.contains("..")
}

/// Where and how hub ids are resolved; [`HubConfig::from_env`] reads the usual variables.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// The hub cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`).
    pub cache_dir: PathBuf,
    /// The hub's base URL, without a trailing `/` (`$HF_ENDPOINT`, else `https://huggingface.co`).
    pub endpoint: String,
    /// The access token (`$HF_TOKEN`, else the file `huggingface-cli login` writes).
    pub token: Option<String>,
    /// `$HF_HUB_OFFLINE`: only the cache is used.
    pub offline: bool,
}

impl HubConfig {
    /// Reads `HF_HUB_CACHE`, `HF_HOME`, `XDG_CACHE_HOME`, `HOME`, `HF_ENDPOINT`, `HF_TOKEN`
    /// (`HUGGING_FACE_HUB_TOKEN`), `HF_TOKEN_PATH` and `HF_HUB_OFFLINE` like `huggingface_hub`.
    pub fn from_env() -> HubConfig {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache = var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| var("HOME").map(|h| Path::new(&h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"));
            cache.join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let endpoint = var("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".to_string());
        let token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| {
                let path = var("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| hf_home.join("token"));
                std::fs::read_to_string(path).ok()
            })
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "on" | "yes" | "true"
            )
        });
        HubConfig {
            cache_dir,
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            offline,
        }
    }
}

/// Resolves a model path as written in a config or on the command line: an existing local path is
/// returned unchanged; a hub id (`org/name`, `org/name@revision`) becomes its snapshot directory in
/// the Hugging Face cache, downloading the missing files (see the [module docs](self)). Settings
/// come from the environment ([`HubConfig::from_env`]).
pub fn resolve_model_path(spec: &str) -> Result<PathBuf, ModelError> {
    resolve_model_path_with(spec, &HubConfig::from_env())
}

/// [`resolve_model_path`] with explicit settings.
pub fn resolve_model_path_with(spec: &str, cfg: &HubConfig) -> Result<PathBuf, ModelError> {
    let local = Path::new(spec);
    if !spec.is_empty() && local.exists() {
        return Ok(local.to_path_buf());
    }
    if spec.starts_with(crate::ollama::PREFIX) {
        return Ok(crate::ollama::resolve(spec)?.gguf);
    }
    let Some(id) = HubId::parse(spec) else {
        return Err(ModelError::format(
            local,
            "no such file or directory (and not a Hugging Face hub id like `org/name`)",
        ));
    };
    let repo_dir = cfg.cache_dir.join(id.cache_folder_name());
    if let Some(commit) = cached_commit(&repo_dir, &id) {
        let snapshot = repo_dir.join("snapshots").join(&commit);
        if missing_files(&repo_dir, &commit).is_empty() {
            return Ok(snapshot);
        }
        if cfg.offline {
            return Err(offline_error(
                &id,
                &repo_dir,
                &missing_files(&repo_dir, &commit).join(", "),
            ));
        }
    } else if cfg.offline {
        return Err(offline_error(&id, &repo_dir, "the whole snapshot"));
    }
    download(&id, &repo_dir, cfg, spec)
}

/// The architecture of a model path or hub id without its weights: a directory's `config.json`
/// (weights need not be there yet), a GGUF or llama2.c file's header; for a hub id only
/// `config.json` is fetched (what `graft train --plan` needs to plan before a download).
pub fn model_spec(spec: &str) -> Result<graft_model::config::ModelSpec, ModelError> {
    model_spec_with(spec, &HubConfig::from_env())
}

/// [`model_spec`] with explicit settings.
pub fn model_spec_with(spec: &str, cfg: &HubConfig) -> Result<graft_model::config::ModelSpec, ModelError> {
    if spec.starts_with(crate::ollama::PREFIX) {
        return Ok(load_model(&crate::ollama::resolve(spec)?.gguf)?.spec);
    }
    let local = Path::new(spec);
    if !spec.is_empty() && local.exists() {
        if local.is_dir() {
            return graft_model::config::ModelSpec::from_config_file(&local.join("config.json"));
        }
        return Ok(load_model(local)?.spec);
    }
    let Some(id) = HubId::parse(spec) else {
        return Err(ModelError::format(
            local,
            "no such file or directory (and not a Hugging Face hub id like `org/name`)",
        ));
    };
    let repo_dir = cfg.cache_dir.join(id.cache_folder_name());
    if let Some(commit) = cached_commit(&repo_dir, &id) {
        let config = repo_dir.join("snapshots").join(&commit).join("config.json");
        if config.is_file() {
            return graft_model::config::ModelSpec::from_config_file(&config);
        }
    }
    if cfg.offline {
        return Err(offline_error(&id, &repo_dir, "config.json"));
    }
    graft_model::config::ModelSpec::from_config_file(&download_config(&id, &repo_dir, cfg, spec)?)
}

/// Resolves `spec` with [`resolve_model_path`] and opens it with [`load_model`].
pub fn load_model_or_download(spec: &str) -> Result<LoadedModel, ModelError> {
    load_model(&resolve_model_path(spec)?)
}

fn offline_error(id: &HubId, repo_dir: &Path, missing: &str) -> ModelError {
    ModelError::format(
        repo_dir,
        format!(
            "HF_HUB_OFFLINE is set and {}@{} is not fully in the cache (missing: {missing}); unset \
             HF_HUB_OFFLINE to download it, or download it elsewhere and copy the cache",
            id.repo, id.revision
        ),
    )
}

/// Whether `s` is a full 40-character commit hash.
fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The commit a revision points at in the cache: the revision itself when it is a commit hash (and
/// its snapshot exists), else `refs/{revision}`.
fn cached_commit(repo_dir: &Path, id: &HubId) -> Option<String> {
    if is_commit_hash(&id.revision) && repo_dir.join("snapshots").join(&id.revision).is_dir() {
        return Some(id.revision.clone());
    }
    let text = std::fs::read_to_string(repo_dir.join("refs").join(&id.revision)).ok()?;
    let commit = text.trim();
    let safe = !commit.is_empty() && !commit.contains(['/', '\\']) && commit != "." && commit != "..";
    (safe && repo_dir.join("snapshots").join(commit).is_dir()).then(|| commit.to_string())
}

/// The files graft needs that snapshot `commit` lacks (optional files never count as missing).
fn missing_files(repo_dir: &Path, commit: &str) -> Vec<String> {
    let snapshot = repo_dir.join("snapshots").join(commit);
    let mut missing: Vec<String> = REQUIRED_FILES
        .iter()
        .filter(|f| !snapshot.join(f).is_file())
        .map(|f| f.to_string())
        .collect();
    if !snapshot.join(SINGLE_WEIGHTS).is_file() {
        let index = snapshot.join(WEIGHTS_INDEX);
        match std::fs::read_to_string(&index)
            .ok()
            .and_then(|t| shard_names(&t).ok())
        {
            Some(shards) => missing.extend(shards.into_iter().filter(|s| !snapshot.join(s).is_file())),
            None => missing.push(format!("{SINGLE_WEIGHTS} or {WEIGHTS_INDEX}")),
        }
    }
    missing
}

/// The shard files a `model.safetensors.index.json` lists, sorted, checked to be plain relative
/// paths.
fn shard_names(index_text: &str) -> Result<Vec<String>, String> {
    let value: serde_json::Value =
        serde_json::from_str(index_text).map_err(|e| format!("invalid JSON: {e}"))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or("`weight_map` is missing or not an object")?;
    let mut shards = std::collections::BTreeSet::new();
    for file in map.values() {
        let file = file.as_str().ok_or("`weight_map` has a non-string shard name")?;
        if !safe_relative(file) {
            return Err(format!("shard name `{file}` is not a plain relative path"));
        }
        shards.insert(file.to_string());
    }
    Ok(shards.into_iter().collect())
}

/// A relative path of normal components only (no `..`, no absolute paths, no backslashes).
fn safe_relative(file: &str) -> bool {
    !file.is_empty()
        && !file.contains('\\')
        && !file.starts_with('/')
        && file
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

#[cfg(not(feature = "hub"))]
fn download(id: &HubId, repo_dir: &Path, _cfg: &HubConfig, spec: &str) -> Result<PathBuf, ModelError> {
    Err(ModelError::format(
        repo_dir,
        format!(
            "`{spec}` is not a local path and {}@{} is not in the Hugging Face cache; this graft was \
             built without the `hub` feature, so download it with `huggingface-cli download {}` (or \
             rebuild with the default features)",
            id.repo, id.revision, id.repo
        ),
    ))
}

#[cfg(not(feature = "hub"))]
fn download_config(id: &HubId, repo_dir: &Path, cfg: &HubConfig, spec: &str) -> Result<PathBuf, ModelError> {
    download(id, repo_dir, cfg, spec)
}

#[cfg(feature = "hub")]
use net::{download, download_config};

#[cfg(feature = "hub")]
mod net {
    use super::*;
    use sha2::{Digest, Sha256};
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    /// Files at least this big get progress lines on stderr.
    const PROGRESS_MIN_BYTES: u64 = 8 << 20;

    /// What the hub said about one file.
    struct FileMeta {
        commit: Option<String>,
        etag: Option<String>,
    }

    /// Downloads only `config.json` of `id` into the cache (snapshot and ref as for
    /// [`download`]) and returns its path.
    pub(super) fn download_config(
        id: &HubId,
        repo_dir: &Path,
        cfg: &HubConfig,
        spec: &str,
    ) -> Result<PathBuf, ModelError> {
        let client = Client::new(cfg, id, spec);
        let blobs = repo_dir.join("blobs");
        mkdir(&blobs)?;
        let (first, _, snapshot) = start_snapshot(&client, id, repo_dir, &blobs)?;
        first.store(&blobs, &snapshot, "config.json")?;
        Ok(snapshot.join("config.json"))
    }

    /// Asks for `config.json` at the revision asked for: its response names the commit, which
    /// names the snapshot directory (created, with the ref of a branch or tag written). Returns
    /// the pending config body, the commit and the snapshot directory.
    fn start_snapshot(
        client: &Client<'_>,
        id: &HubId,
        repo_dir: &Path,
        blobs: &Path,
    ) -> Result<(Pending, String, PathBuf), ModelError> {
        let (first, meta) = client.get(&id.revision, "config.json", Some(blobs))?;
        let first = first.ok_or_else(|| client.not_found_error("config.json"))?;
        let commit = meta
            .commit
            .filter(|c| !c.is_empty() && !c.contains(['/', '\\', '.']))
            .unwrap_or_else(|| id.revision.clone());
        let snapshot = repo_dir.join("snapshots").join(&commit);
        mkdir(&snapshot)?;
        if commit != id.revision {
            let ref_path = repo_dir.join("refs").join(&id.revision);
            if let Some(parent) = ref_path.parent() {
                mkdir(parent)?;
            }
            graft_model::weights::write_file_atomically(&ref_path, commit.as_bytes())?;
        }
        Ok((first, commit, snapshot))
    }

    /// Downloads what `id` lacks in the cache and returns its snapshot directory.
    pub(super) fn download(
        id: &HubId,
        repo_dir: &Path,
        cfg: &HubConfig,
        spec: &str,
    ) -> Result<PathBuf, ModelError> {
        let client = Client::new(cfg, id, spec);
        let blobs = repo_dir.join("blobs");
        mkdir(&blobs)?;
        // config.json first: every other file is fetched at the commit it names, so the snapshot
        // is consistent.
        let (first, commit, snapshot) = start_snapshot(&client, id, repo_dir, &blobs)?;
        let fetch = |file: &str, optional: bool| -> Result<bool, ModelError> {
            if snapshot.join(file).is_file() {
                return Ok(true);
            }
            let no_exist = repo_dir.join(".no_exist").join(&commit).join(file);
            if optional && no_exist.is_file() {
                return Ok(false);
            }
            if !client.fetch_into(&commit, file, &blobs, &snapshot)? {
                if !optional {
                    return Err(client.not_found_error(file));
                }
                // Remember the 404 like huggingface_hub does, so later runs do not ask again.
                if let Some(parent) = no_exist.parent() {
                    let _ = std::fs::create_dir_all(parent);
                }
                let _ = std::fs::File::create(&no_exist);
                return Ok(false);
            }
            Ok(true)
        };
        if !snapshot.join("config.json").is_file() {
            first.store(&blobs, &snapshot, "config.json")?;
        } else {
            drop(first);
        }
        for file in REQUIRED_FILES.iter().filter(|f| **f != "config.json") {
            fetch(file, false)?;
        }
        for file in OPTIONAL_FILES {
            fetch(file, true)?;
        }
        let has_index = snapshot.join(WEIGHTS_INDEX).is_file();
        if has_index || !fetch(SINGLE_WEIGHTS, true)? {
            if !fetch(WEIGHTS_INDEX, true)? {
                return Err(ModelError::format(
                    repo_dir,
                    format!(
                        "{} at {commit} has neither {SINGLE_WEIGHTS} nor {WEIGHTS_INDEX}; graft reads \
                         safetensors weights only (check the repo's files on the hub)",
                        id.repo
                    ),
                ));
            }
            let index = snapshot.join(WEIGHTS_INDEX);
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
            let shards = shard_names(&text).map_err(|m| ModelError::format(&index, m))?;
            for shard in shards {
                fetch(&shard, false)?;
            }
        }
        let missing = missing_files(repo_dir, &commit);
        if !missing.is_empty() {
            return Err(ModelError::format(
                &snapshot,
                format!("still missing after the download: {}", missing.join(", ")),
            ));
        }
        Ok(snapshot)
    }

    fn mkdir(dir: &Path) -> Result<(), ModelError> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))
    }

    /// A blocking HTTP client for one repo.
    struct Client<'a> {
        agent: ureq::Agent,
        cfg: &'a HubConfig,
        id: &'a HubId,
        spec: &'a str,
    }

    /// A response whose body has not been read yet.
    struct Pending {
        /// `None` when the blob named by `etag` is already in the cache.
        response: Option<ureq::http::Response<ureq::Body>>,
        url: String,
        etag: Option<String>,
        /// Bytes already in the `.incomplete` file that this (206) response continues.
        resume_from: u64,
        label: String,
    }

    impl<'a> Client<'a> {
        fn new(cfg: &'a HubConfig, id: &'a HubId, spec: &'a str) -> Client<'a> {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .max_redirects(0)
                .timeout_connect(Some(Duration::from_secs(30)))
                .timeout_recv_response(Some(Duration::from_secs(120)))
                .user_agent(format!("graft/{}", env!("CARGO_PKG_VERSION")))
                .build()
                .into();
            Client { agent, cfg, id, spec }
        }

        fn url(&self, revision: &str, file: &str) -> String {
            let file: Vec<String> = file.split('/').map(encode).collect();
            format!(
                "{}/{}/resolve/{}/{}",
                self.cfg.endpoint,
                self.id.repo,
                encode(revision),
                file.join("/")
            )
        }

        fn error(&self, file: &str, message: String) -> ModelError {
            let rev = if self.id.revision == "main" {
                String::new()
            } else {
                format!("@{}", self.id.revision)
            };
            ModelError::Format {
                path: self.spec.to_string(),
                message: format!(
                    "no such local path, so fetched from the hub as {}{rev}: {file}: {message}",
                    self.id.repo
                ),
            }
        }

        fn not_found_error(&self, file: &str) -> ModelError {
            self.error(
                file,
                format!(
                    "HTTP 404 from {}: no such repo, revision `{}` or file; check the hub id (and that \
                     a local path, if you meant one, exists)",
                    self.cfg.endpoint, self.id.revision
                ),
            )
        }

        /// Sends a GET, following up to 5 redirects by hand so the hub's own headers (commit,
        /// etag) are seen; the token goes only to the hub's host. `Ok(None)` on 404.
        /// With `blobs`, a redirect to content already in `blobs/{etag}` is not followed, and a
        /// partial `blobs/{etag}.incomplete` is continued with a `Range` request.
        fn get(
            &self,
            revision: &str,
            file: &str,
            blobs: Option<&Path>,
        ) -> Result<(Option<Pending>, FileMeta), ModelError> {
            let mut url = self.url(revision, file);
            let mut meta = FileMeta {
                commit: None,
                etag: None,
            };
            let mut resume_from = 0u64;
            for _hop in 0..6 {
                let mut request = self.agent.get(&url);
                if let Some(token) = &self.cfg.token
                    && same_origin(&url, &self.cfg.endpoint)
                {
                    request = request.header("Authorization", format!("Bearer {token}"));
                }
                if resume_from > 0 {
                    request = request.header("Range", format!("bytes={resume_from}-"));
                }
                let response = request.call().map_err(|e| {
                    self.error(
                        file,
                        format!(
                            "cannot reach {url}: {e}; check the network (or HF_ENDPOINT), or set \
                             HF_HUB_OFFLINE=1 to use only models already in the cache"
                        ),
                    )
                })?;
                let status = response.status().as_u16();
                let header = |name: &str| {
                    response
                        .headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(|v| v.trim().to_string())
                };
                meta.commit = meta.commit.or_else(|| header("x-repo-commit"));
                meta.etag = meta
                    .etag
                    .or_else(|| header("x-linked-etag").or_else(|| header("etag")).map(clean_etag));
                match status {
                    200..=299 => {
                        let resume_from = if status == 206 { resume_from } else { 0 };
                        let pending = Pending {
                            response: Some(response),
                            url,
                            etag: meta.etag.clone(),
                            resume_from,
                            label: format!("{}/{}", self.id.repo, file),
                        };
                        return Ok((Some(pending), meta));
                    }
                    301 | 302 | 303 | 307 | 308 => {
                        let Some(location) = header("location") else {
                            return Err(
                                self.error(file, format!("HTTP {status} without a Location from {url}"))
                            );
                        };
                        url = join_url(&url, &location);
                        // Before fetching the content: reuse a blob we already have, or continue
                        // a partial one.
                        if let (Some(blobs), Some(etag)) = (blobs, &meta.etag) {
                            if blobs.join(etag).is_file() {
                                let pending = Pending {
                                    response: None,
                                    url,
                                    etag: Some(etag.clone()),
                                    resume_from: 0,
                                    label: String::new(),
                                };
                                return Ok((Some(pending), meta));
                            }
                            resume_from = std::fs::metadata(blobs.join(format!("{etag}.incomplete")))
                                .map(|m| m.len())
                                .unwrap_or(0);
                        }
                    }
                    404 => return Ok((None, meta)),
                    401 | 403 => {
                        let what = if self.cfg.token.is_some() {
                            "the token in HF_TOKEN has no access to it; accept the model's license on its \
                             hub page or use a token that can read it"
                        } else {
                            "the repo is private or gated (or the id is wrong); set HF_TOKEN (or run \
                             `huggingface-cli login`) with a token that can read it"
                        };
                        return Err(self.error(file, format!("HTTP {status} from {url}: {what}")));
                    }
                    416 if resume_from > 0 => {
                        // The partial file is not a prefix of this content: start over.
                        if let (Some(blobs), Some(etag)) = (blobs, &meta.etag) {
                            let _ = std::fs::remove_file(blobs.join(format!("{etag}.incomplete")));
                        }
                        resume_from = 0;
                    }
                    _ => {
                        return Err(self.error(
                            file,
                            format!("HTTP {status} from {url}; try again later, or check HF_ENDPOINT"),
                        ));
                    }
                }
            }
            Err(self.error(file, "too many redirects".to_string()))
        }

        /// Downloads `file` at `commit` into the blobs and links it into the snapshot; `None` on 404.
        fn fetch_into(
            &self,
            commit: &str,
            file: &str,
            blobs: &Path,
            snapshot: &Path,
        ) -> Result<bool, ModelError> {
            match self.get(commit, file, Some(blobs))?.0 {
                None => Ok(false),
                Some(pending) => pending.store(blobs, snapshot, file).map(|()| true),
            }
        }
    }

    impl Pending {
        /// Streams the body into `blobs/{etag}` (via `{etag}.incomplete`, renamed when complete)
        /// and links `snapshot/{file}` to it.
        fn store(self, blobs: &Path, snapshot: &Path, file: &str) -> Result<(), ModelError> {
            let blob_name = match (&self.response, &self.etag) {
                (None, Some(etag)) => etag.clone(),
                _ => self.write_blob(blobs)?,
            };
            link_into_snapshot(&blobs.join(&blob_name), snapshot, file)
        }

        fn write_blob(self, blobs: &Path) -> Result<String, ModelError> {
            static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);
            let etag = self
                .etag
                .filter(|e| !e.is_empty() && !e.contains(['/', '\\', '.']));
            if let Some(etag) = &etag
                && blobs.join(etag).is_file()
            {
                return Ok(etag.clone());
            }
            let temp = match &etag {
                Some(etag) => blobs.join(format!("{etag}.incomplete")),
                None => blobs.join(format!(
                    "tmp-{}-{}.incomplete",
                    std::process::id(),
                    TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
                )),
            };
            let io = |e: std::io::Error| ModelError::io(&temp, e);
            let mut hasher = Sha256::new();
            let mut out = if self.resume_from > 0 {
                // Hash what is already there so the sha256 of the whole file can still be checked.
                let mut existing = std::fs::File::open(&temp).map_err(io)?;
                let mut buf = vec![0u8; 1 << 20];
                let mut seen = 0u64;
                while seen < self.resume_from {
                    let n = existing.read(&mut buf).map_err(io)?;
                    if n == 0 {
                        break;
                    }
                    let n = n.min((self.resume_from - seen) as usize);
                    hasher.update(&buf[..n]);
                    seen += n as u64;
                }
                let f = std::fs::OpenOptions::new().write(true).open(&temp).map_err(io)?;
                f.set_len(self.resume_from).map_err(io)?;
                let mut f = f;
                std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(self.resume_from)).map_err(io)?;
                f
            } else {
                std::fs::File::create(&temp).map_err(io)?
            };
            let Some(response) = self.response else {
                return Err(ModelError::Format {
                    path: self.url,
                    message: "no response body".into(),
                });
            };
            let body_len = response.body().content_length();
            let total = body_len.map(|n| n + self.resume_from);
            let mut progress = Progress::new(&self.label, total, self.resume_from);
            let mut reader = response.into_body().into_reader();
            let mut buf = vec![0u8; 1 << 20];
            let mut written = self.resume_from;
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        return Err(ModelError::Format {
                            path: self.url.clone(),
                            message: format!(
                                "download interrupted after {written} bytes: {e}; run again to resume"
                            ),
                        });
                    }
                };
                out.write_all(&buf[..n]).map_err(io)?;
                hasher.update(&buf[..n]);
                written += n as u64;
                progress.update(written);
            }
            if let Some(total) = total
                && written != total
            {
                return Err(ModelError::Format {
                    path: self.url,
                    message: format!("got {written} of {total} bytes; run again to resume"),
                });
            }
            out.sync_all().map_err(io)?;
            drop(out);
            progress.finish(written);
            let sha = hex(&hasher.finalize());
            let name = match etag {
                Some(etag) => {
                    if is_sha256(&etag) && etag != sha {
                        let _ = std::fs::remove_file(&temp);
                        return Err(ModelError::Format {
                            path: self.url,
                            message: format!("sha256 mismatch: expected {etag}, got {sha}; run again"),
                        });
                    }
                    etag
                }
                None => sha,
            };
            let blob = blobs.join(&name);
            std::fs::rename(&temp, &blob).map_err(|e| ModelError::io(&blob, e))?;
            Ok(name)
        }
    }

    /// Makes `snapshot/{file}` point at `blob`: a relative symlink (`../../blobs/{etag}`) like
    /// huggingface_hub, else a hard link, else a copy. Replaces the entry atomically.
    fn link_into_snapshot(blob: &Path, snapshot: &Path, file: &str) -> Result<(), ModelError> {
        let dest = snapshot.join(file);
        let parent = dest.parent().unwrap_or(snapshot).to_path_buf();
        mkdir(&parent)?;
        let tmp = parent.join(format!(
            ".{}.graft-link",
            dest.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        let _ = std::fs::remove_file(&tmp);
        let linked = symlink_relative(blob, &tmp, file)
            || std::fs::hard_link(blob, &tmp).is_ok()
            || std::fs::copy(blob, &tmp).is_ok();
        if !linked {
            return Err(ModelError::format(
                &dest,
                format!("cannot link or copy {}", blob.display()),
            ));
        }
        std::fs::rename(&tmp, &dest).map_err(|e| ModelError::io(&dest, e))
    }

    #[cfg(unix)]
    fn symlink_relative(blob: &Path, link: &Path, file: &str) -> bool {
        // snapshots/{commit}/{file} → ../../ (+ one ../ per folder in file) blobs/{etag}
        let depth = file.matches('/').count();
        let mut target = PathBuf::from("../..");
        for _ in 0..depth {
            target.push("..");
        }
        target.push("blobs");
        let Some(name) = blob.file_name() else {
            return false;
        };
        target.push(name);
        std::os::unix::fs::symlink(&target, link).is_ok()
    }

    #[cfg(not(unix))]
    fn symlink_relative(_blob: &Path, _link: &Path, _file: &str) -> bool {
        false
    }

    /// Progress lines on stderr for big files: `\r`-updated on a terminal, every 10% otherwise.
    struct Progress {
        label: String,
        total: Option<u64>,
        start: Instant,
        start_bytes: u64,
        last_print: Instant,
        last_decile: u64,
        active: bool,
        tty: bool,
    }

    impl Progress {
        fn new(label: &str, total: Option<u64>, start_bytes: u64) -> Progress {
            use std::io::IsTerminal;
            let active = total.is_none_or(|t| t >= PROGRESS_MIN_BYTES);
            let tty = std::io::stderr().is_terminal();
            if active {
                let size = total.map(|t| format!(" ({})", mb(t))).unwrap_or_default();
                let resume = if start_bytes > 0 {
                    format!(", resuming at {}", mb(start_bytes))
                } else {
                    String::new()
                };
                eprintln!("downloading {label}{size}{resume}");
            }
            Progress {
                label: label.to_string(),
                total,
                start: Instant::now(),
                start_bytes,
                last_print: Instant::now(),
                last_decile: 0,
                active,
                tty,
            }
        }

        fn update(&mut self, done: u64) {
            if !self.active || done < PROGRESS_MIN_BYTES && self.total.is_none() {
                return;
            }
            let decile = self
                .total
                .map(|t| done.saturating_mul(10) / t.max(1))
                .unwrap_or(done >> 27);
            let due = if self.tty {
                self.last_print.elapsed() >= Duration::from_millis(500)
            } else {
                decile > self.last_decile
            };
            if due {
                self.last_print = Instant::now();
                self.last_decile = decile;
                let line = self.line(done);
                if self.tty {
                    eprint!("\r{line}   ");
                } else {
                    eprintln!("{line}");
                }
            }
        }

        fn line(&self, done: u64) -> String {
            let secs = self.start.elapsed().as_secs_f64().max(1e-3);
            let rate = (done - self.start_bytes) as f64 / secs / 1e6;
            match self.total {
                Some(t) => format!(
                    "  {}: {} / {} ({}%), {rate:.1} MB/s",
                    self.label,
                    mb(done),
                    mb(t),
                    done * 100 / t.max(1)
                ),
                None => format!("  {}: {}, {rate:.1} MB/s", self.label, mb(done)),
            }
        }

        fn finish(&self, done: u64) {
            if self.active {
                let line = self.line(done);
                if self.tty {
                    eprintln!("\r{line}   ");
                } else if self.last_decile < 10 {
                    eprintln!("{line}");
                }
            }
        }
    }

    fn mb(bytes: u64) -> String {
        format!("{:.1} MB", bytes as f64 / 1e6)
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn is_sha256(s: &str) -> bool {
        s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
    }

    /// `W/"abc"` → `abc`.
    fn clean_etag(etag: String) -> String {
        etag.trim().trim_start_matches("W/").trim_matches('"').to_string()
    }

    /// Percent-encodes everything but unreserved characters (a revision's `/` becomes `%2F`).
    fn encode(s: &str) -> String {
        let mut out = String::with_capacity(s.len());
        for b in s.bytes() {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    }

    /// `scheme://host[:port]` of a URL.
    fn origin(url: &str) -> &str {
        let after_scheme = url.find("://").map(|i| i + 3).unwrap_or(0);
        match url[after_scheme..].find('/') {
            Some(i) => &url[..after_scheme + i],
            None => url,
        }
    }

    fn same_origin(a: &str, b: &str) -> bool {
        origin(a).eq_ignore_ascii_case(origin(b))
    }

    /// Resolves a `Location` against the URL it came from.
    fn join_url(base: &str, location: &str) -> String {
        if location.contains("://") {
            location.to_string()
        } else if location.starts_with('/') {
            format!("{}{location}", origin(base))
        } else {
            let dir = base.rfind('/').map(|i| &base[..=i]).unwrap_or(base);
            format!("{dir}{location}")
        }
    }

    #[cfg(test)]
    pub(super) fn test_join_url(base: &str, location: &str) -> String {
        join_url(base, location)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh empty directory under the system temp dir.
    pub(super) fn temp_dir(tag: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "graft-hub-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Writes a tiny random model (config.json + model.safetensors) and tokenizer files to `dir`.
    pub(super) fn write_tiny_model(dir: &Path) {
        let spec = graft_model::shapes::named_shape("tiny").unwrap();
        let shapes = graft_model::weights::hf_tensor_shapes(&spec);
        let values: Vec<Vec<f32>> = shapes
            .iter()
            .map(|(name, shape)| graft_model::shapes::random_tensor(name, shape, 7))
            .collect();
        let tensors: Vec<(String, Vec<usize>, &[f32])> = shapes
            .iter()
            .zip(&values)
            .map(|((n, s), v)| (n.clone(), s.clone(), v.as_slice()))
            .collect();
        graft_model::weights::save_hf_model_dir(dir, &spec, &tensors).unwrap();
        std::fs::write(
            dir.join("tokenizer.json"),
            r#"{"version":"1.0","model":{"type":"BPE"}}"#,
        )
        .unwrap();
        std::fs::write(dir.join("tokenizer_config.json"), r#"{"eos_token":"</s>"}"#).unwrap();
    }

    #[test]
    fn hub_ids_parse() {
        let id = HubId::parse("HuggingFaceTB/SmolLM2-135M-Instruct").unwrap();
        assert_eq!(id.repo, "HuggingFaceTB/SmolLM2-135M-Instruct");
        assert_eq!(id.revision, "main");
        assert_eq!(
            id.cache_folder_name(),
            "models--HuggingFaceTB--SmolLM2-135M-Instruct"
        );
        let id = HubId::parse("Qwen/Qwen2.5-0.5B@refs/pr/1").unwrap();
        assert_eq!(
            (id.repo.as_str(), id.revision.as_str()),
            ("Qwen/Qwen2.5-0.5B", "refs/pr/1")
        );
        for bad in [
            "",
            "/",
            "a",
            "a/",
            "/b",
            "a/b/c",
            "./a/b",
            "../a",
            "a/b@",
            "a/b@../x",
            "a/b@x/../y",
            "~/m",
            "/abs/path",
            "org/model.gguf",
            "org/model.bin",
            "a b/c",
            "a--b/c",
            "-a/b",
            "a/b.",
            "org/na..me",
            "a/b@c@d",
            "é/b",
        ] {
            assert_eq!(HubId::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn hub_local_paths_and_non_ids() {
        let dir = temp_dir("local");
        let cfg = HubConfig {
            cache_dir: dir.join("cache"),
            endpoint: "http://127.0.0.1:9".into(),
            token: None,
            offline: false,
        };
        let spec = dir.to_string_lossy().into_owned();
        assert_eq!(resolve_model_path_with(&spec, &cfg).unwrap(), dir);
        let missing = dir.join("nope.gguf").to_string_lossy().into_owned();
        let e = resolve_model_path_with(&missing, &cfg).unwrap_err().to_string();
        assert!(e.contains("nope.gguf") && e.contains("hub id"), "{e}");
        assert!(resolve_model_path_with("", &cfg).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hub_offline_uses_a_python_style_cache_and_errors_when_missing() {
        // The layout huggingface_hub writes: refs/main, blobs/{etag}, snapshot symlinks.
        let dir = temp_dir("pycache");
        let src = dir.join("src");
        write_tiny_model(&src);
        let cache = dir.join("hub");
        let repo = cache.join("models--org--tiny");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let snapshot = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), commit).unwrap();
        for (i, f) in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
        .iter()
        .enumerate()
        {
            let blob = format!("blob{i}");
            std::fs::copy(src.join(f), repo.join("blobs").join(&blob)).unwrap();
            #[cfg(unix)]
            std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snapshot.join(f)).unwrap();
            #[cfg(not(unix))]
            std::fs::copy(src.join(f), snapshot.join(f)).unwrap();
        }
        let cfg = HubConfig {
            cache_dir: cache.clone(),
            endpoint: "http://127.0.0.1:9".into(),
            token: None,
            offline: true,
        };
        assert_eq!(resolve_model_path_with("org/tiny", &cfg).unwrap(), snapshot);
        assert_eq!(
            resolve_model_path_with(&format!("org/tiny@{commit}"), &cfg).unwrap(),
            snapshot
        );
        let loaded = load_model(&resolve_model_path_with("org/tiny", &cfg).unwrap()).unwrap();
        assert_eq!(loaded.spec.hidden_size, 64);
        let e = resolve_model_path_with("org/other", &cfg)
            .unwrap_err()
            .to_string();
        assert!(e.contains("HF_HUB_OFFLINE") && e.contains("org/other"), "{e}");
        let e = resolve_model_path_with("org/tiny@v2", &cfg)
            .unwrap_err()
            .to_string();
        assert!(e.contains("HF_HUB_OFFLINE"), "{e}");
        // A snapshot lacking a needed file is reported by name.
        std::fs::remove_file(snapshot.join("tokenizer.json")).unwrap();
        let e = resolve_model_path_with("org/tiny", &cfg).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(all(test, feature = "hub"))]
mod download_tests {
    use super::tests::{temp_dir, write_tiny_model};
    use super::*;
    use sha2::{Digest, Sha256};
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    /// One repo on the fake hub.
    struct FakeRepo {
        commit: String,
        files: HashMap<String, Vec<u8>>,
        /// Required `Authorization: Bearer` token, if the repo is gated.
        token: Option<String>,
    }

    /// A minimal HTTP/1.1 hub on 127.0.0.1: `/{repo}/resolve/{rev}/{file}` answers like
    /// huggingface.co (X-Repo-Commit, ETag; `.safetensors` files 302 to `/cdn/{sha256}` with
    /// X-Linked-Etag), `/cdn/` honours `Range`. Every request is logged.
    struct FakeHub {
        endpoint: String,
        log: Arc<Mutex<Vec<String>>>,
        /// When set, the next `/cdn/` response stops halfway through its body.
        cut_next_cdn: Arc<AtomicBool>,
    }

    fn sha256_hex(bytes: &[u8]) -> String {
        Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
    }

    impl FakeHub {
        fn start(repos: HashMap<String, FakeRepo>) -> FakeHub {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let endpoint = format!("http://{}", listener.local_addr().unwrap());
            let log = Arc::new(Mutex::new(Vec::new()));
            let cut_next_cdn = Arc::new(AtomicBool::new(false));
            let (log2, cut2) = (log.clone(), cut_next_cdn.clone());
            let repos = Arc::new(repos);
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let _ = serve(stream, &repos, &log2, &cut2);
                }
            });
            FakeHub {
                endpoint,
                log,
                cut_next_cdn,
            }
        }

        fn requests(&self) -> Vec<String> {
            self.log.lock().unwrap().clone()
        }
    }

    fn serve(
        stream: TcpStream,
        repos: &HashMap<String, FakeRepo>,
        log: &Mutex<Vec<String>>,
        cut_next_cdn: &AtomicBool,
    ) -> std::io::Result<()> {
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let range = headers.get("range").cloned();
        log.lock().unwrap().push(match &range {
            Some(r) => format!("{path} [{r}]"),
            None => path.clone(),
        });
        let mut out = stream;
        let respond =
            |out: &mut TcpStream, status: &str, extra: &[(String, String)], body: &[u8], send: usize| {
                let mut head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
                    body.len()
                );
                for (k, v) in extra {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                out.write_all(head.as_bytes())?;
                out.write_all(&body[..send.min(body.len())])?;
                out.flush()
            };
        if let Some(sha) = path.strip_prefix("/cdn/") {
            let blob = repos
                .values()
                .flat_map(|r| r.files.values())
                .find(|b| sha256_hex(b) == sha);
            let Some(blob) = blob else {
                return respond(&mut out, "404 Not Found", &[], b"", 0);
            };
            let start = range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok())
                .unwrap_or(0)
                .min(blob.len());
            let (status, body) = if start > 0 {
                ("206 Partial Content", &blob[start..])
            } else {
                ("200 OK", &blob[..])
            };
            let send = if cut_next_cdn.swap(false, Ordering::SeqCst) {
                body.len() / 2
            } else {
                body.len()
            };
            return respond(&mut out, status, &[], body, send);
        }
        // /{org}/{name}/resolve/{rev}/{file}
        let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
        if parts.len() != 5 || parts[2] != "resolve" {
            return respond(&mut out, "400 Bad Request", &[], b"", 0);
        }
        let Some(repo) = repos.get(&format!("{}/{}", parts[0], parts[1])) else {
            return respond(
                &mut out,
                "404 Not Found",
                &[("X-Error-Code".into(), "RepositoryNotFound".into())],
                b"",
                0,
            );
        };
        if let Some(token) = &repo.token
            && headers.get("authorization") != Some(&format!("Bearer {token}"))
        {
            return respond(&mut out, "401 Unauthorized", &[], b"gated", 0);
        }
        let rev = parts[3].replace("%2F", "/");
        if !["main", "v1", repo.commit.as_str()].contains(&rev.as_str()) {
            return respond(
                &mut out,
                "404 Not Found",
                &[("X-Error-Code".into(), "RevisionNotFound".into())],
                b"",
                0,
            );
        }
        let commit = ("X-Repo-Commit".to_string(), repo.commit.clone());
        let Some(body) = repo.files.get(parts[4]) else {
            return respond(
                &mut out,
                "404 Not Found",
                &[commit, ("X-Error-Code".into(), "EntryNotFound".into())],
                b"",
                0,
            );
        };
        let sha = sha256_hex(body);
        if parts[4].ends_with(".safetensors") {
            let extra = [
                commit,
                ("X-Linked-Etag".into(), format!("\"{sha}\"")),
                ("X-Linked-Size".into(), body.len().to_string()),
                ("Location".into(), format!("/cdn/{sha}")),
            ];
            return respond(&mut out, "302 Found", &extra, b"", 0);
        }
        let extra = [commit, ("ETag".into(), format!("W/\"{}\"", &sha[..40]))];
        respond(&mut out, "200 OK", &extra, body, body.len())
    }

    fn repo_from_dir(dir: &Path, commit: &str, token: Option<&str>) -> FakeRepo {
        let mut files = HashMap::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            files.insert(
                path.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&path).unwrap(),
            );
        }
        FakeRepo {
            commit: commit.to_string(),
            files,
            token: token.map(str::to_string),
        }
    }

    const COMMIT_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const COMMIT_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const COMMIT_G: &str = "cccccccccccccccccccccccccccccccccccccccc";

    /// A hub with `org/tiny` (single file + generation_config.json), `org/sharded` (index and two
    /// shards) and `org/gated` (needs token `secret`).
    fn fake_hub(dir: &Path) -> FakeHub {
        let single = dir.join("single");
        write_tiny_model(&single);
        std::fs::write(single.join("generation_config.json"), r#"{"eos_token_id": 2}"#).unwrap();
        let sharded = dir.join("sharded");
        write_tiny_model(&sharded);
        let store = graft_model::weights::open_hf_weights(&sharded).unwrap();
        let names: Vec<String> = store.names().iter().map(|s| s.to_string()).collect();
        let spec = graft_model::shapes::named_shape("tiny").unwrap();
        let shapes: HashMap<String, Vec<usize>> = graft_model::weights::hf_tensor_shapes(&spec)
            .into_iter()
            .collect();
        let values: Vec<Vec<f32>> = names.iter().map(|n| store.f32(n, &shapes[n]).unwrap()).collect();
        let mut weight_map = serde_json::Map::new();
        let half = names.len() / 2;
        for (k, range) in [(1, 0..half), (2, half..names.len())] {
            let shard = format!("model-0000{k}-of-00002.safetensors");
            let tensors: Vec<(String, Vec<usize>, &[f32])> = range
                .map(|i| {
                    weight_map.insert(names[i].clone(), shard.clone().into());
                    (names[i].clone(), shapes[&names[i]].clone(), values[i].as_slice())
                })
                .collect();
            graft_model::weights::save_safetensors(&sharded.join(&shard), &tensors, None).unwrap();
        }
        drop(store);
        std::fs::remove_file(sharded.join("model.safetensors")).unwrap();
        let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
        std::fs::write(sharded.join("model.safetensors.index.json"), index.to_string()).unwrap();
        let mut repos = HashMap::new();
        repos.insert("org/tiny".to_string(), repo_from_dir(&single, COMMIT_A, None));
        repos.insert("org/sharded".to_string(), repo_from_dir(&sharded, COMMIT_B, None));
        repos.insert(
            "org/gated".to_string(),
            repo_from_dir(&single, COMMIT_G, Some("secret")),
        );
        FakeHub::start(repos)
    }

    fn config(hub: &FakeHub, cache: &Path) -> HubConfig {
        HubConfig {
            cache_dir: cache.to_path_buf(),
            endpoint: hub.endpoint.clone(),
            token: None,
            offline: false,
        }
    }

    #[test]
    fn hub_download_single_file_layout_reuse_and_offline() {
        let dir = temp_dir("single");
        let hub = fake_hub(&dir);
        let cache = dir.join("hub");
        let cfg = config(&hub, &cache);
        let snapshot = resolve_model_path_with("org/tiny", &cfg).unwrap();
        let repo = cache.join("models--org--tiny");
        assert_eq!(snapshot, repo.join("snapshots").join(COMMIT_A));
        assert_eq!(std::fs::read_to_string(repo.join("refs/main")).unwrap(), COMMIT_A);
        let weights = std::fs::read(dir.join("single/model.safetensors")).unwrap();
        let sha = sha256_hex(&weights);
        assert_eq!(std::fs::read(repo.join("blobs").join(&sha)).unwrap(), weights);
        #[cfg(unix)]
        {
            let link = std::fs::read_link(snapshot.join("model.safetensors")).unwrap();
            assert_eq!(link, Path::new("../../blobs").join(&sha));
            let link = std::fs::read_link(snapshot.join("config.json")).unwrap();
            assert!(link.starts_with("../../blobs"), "{link:?}");
        }
        for f in [
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ] {
            assert_eq!(
                std::fs::read(snapshot.join(f)).unwrap(),
                std::fs::read(dir.join("single").join(f)).unwrap()
            );
        }
        // Optional files the repo lacks: 404, remembered like huggingface_hub does.
        for f in ["special_tokens_map.json", "chat_template.jinja"] {
            assert!(!snapshot.join(f).exists());
            assert!(repo.join(".no_exist").join(COMMIT_A).join(f).is_file(), "{f}");
        }
        let leftovers: Vec<_> = std::fs::read_dir(repo.join("blobs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("incomplete"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        let reqs = hub.requests();
        assert!(
            reqs.contains(&"/org/tiny/resolve/main/config.json".to_string()),
            "{reqs:?}"
        );
        assert!(
            reqs.contains(&format!("/org/tiny/resolve/{COMMIT_A}/model.safetensors")),
            "{reqs:?}"
        );
        assert!(reqs.contains(&format!("/cdn/{sha}")), "{reqs:?}");
        let loaded = load_model(&snapshot).unwrap();
        assert_eq!(loaded.spec.num_layers, 2);
        assert!(matches!(
            loaded.tokenizer,
            graft_model::weights::TokenizerSource::HfDir(_)
        ));

        // Second resolve: no network at all.
        let n = hub.requests().len();
        assert_eq!(resolve_model_path_with("org/tiny", &cfg).unwrap(), snapshot);
        assert_eq!(
            resolve_model_path_with(&format!("org/tiny@{COMMIT_A}"), &cfg).unwrap(),
            snapshot
        );
        assert_eq!(hub.requests().len(), n);
        // Offline: the cache still serves it; a model not in the cache is a clear error.
        let offline = HubConfig {
            offline: true,
            ..cfg.clone()
        };
        assert_eq!(resolve_model_path_with("org/tiny", &offline).unwrap(), snapshot);
        let e = resolve_model_path_with("org/sharded", &offline)
            .unwrap_err()
            .to_string();
        assert!(e.contains("HF_HUB_OFFLINE"), "{e}");
        assert_eq!(hub.requests().len(), n);

        // Another revision of the same commit: one request (config.json), blobs reused.
        let v1 = resolve_model_path_with("org/tiny@v1", &cfg).unwrap();
        assert_eq!(v1, snapshot);
        assert_eq!(std::fs::read_to_string(repo.join("refs/v1")).unwrap(), COMMIT_A);
        assert_eq!(hub.requests().len(), n + 1);

        // A snapshot missing a file (deleted by hand) is repaired, and only that file is fetched.
        std::fs::remove_file(snapshot.join("tokenizer.json")).unwrap();
        resolve_model_path_with("org/tiny", &cfg).unwrap();
        assert_eq!(
            &hub.requests()[n + 1..],
            [
                "/org/tiny/resolve/main/config.json",
                &format!("/org/tiny/resolve/{COMMIT_A}/tokenizer.json")
            ]
        );
        assert!(snapshot.join("tokenizer.json").is_file());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hub_download_sharded() {
        let dir = temp_dir("sharded");
        let hub = fake_hub(&dir);
        let cfg = config(&hub, &dir.join("hub"));
        let snapshot = resolve_model_path_with("org/sharded", &cfg).unwrap();
        assert!(snapshot.ends_with(format!("models--org--sharded/snapshots/{COMMIT_B}")));
        for f in [
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ] {
            assert!(snapshot.join(f).is_file(), "{f}");
        }
        assert!(!snapshot.join("model.safetensors").exists());
        let no_exist = dir.join("hub/models--org--sharded/.no_exist").join(COMMIT_B);
        assert!(no_exist.join("model.safetensors").is_file());
        assert!(no_exist.join("generation_config.json").is_file());
        let loaded = load_model(&snapshot).unwrap();
        assert_eq!(loaded.spec.hidden_size, 64);
        let n = hub.requests().len();
        resolve_model_path_with("org/sharded", &cfg).unwrap();
        assert_eq!(hub.requests().len(), n);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hub_errors_name_repo_status_and_fix() {
        let dir = temp_dir("errors");
        let hub = fake_hub(&dir);
        let cfg = config(&hub, &dir.join("hub"));
        let e = resolve_model_path_with("org/gated", &cfg)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("org/gated") && e.contains("401") && e.contains("HF_TOKEN"),
            "{e}"
        );
        let wrong = HubConfig {
            token: Some("wrong".into()),
            ..cfg.clone()
        };
        let e = resolve_model_path_with("org/gated", &wrong)
            .unwrap_err()
            .to_string();
        assert!(e.contains("401") && e.contains("token"), "{e}");
        let with_token = HubConfig {
            token: Some("secret".into()),
            ..cfg.clone()
        };
        let snapshot = resolve_model_path_with("org/gated", &with_token).unwrap();
        assert!(load_model(&snapshot).is_ok());

        let e = resolve_model_path_with("org/missing", &cfg)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("org/missing") && e.contains("404") && e.contains("check the hub id"),
            "{e}"
        );
        let e = resolve_model_path_with("org/tiny@nope", &cfg)
            .unwrap_err()
            .to_string();
        assert!(e.contains("404") && e.contains("nope"), "{e}");
        let down = HubConfig {
            endpoint: "http://127.0.0.1:1".into(),
            ..cfg.clone()
        };
        let e = resolve_model_path_with("org/tiny", &down)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot reach") && e.contains("HF_HUB_OFFLINE"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hub_interrupted_download_resumes() {
        let dir = temp_dir("resume");
        let hub = fake_hub(&dir);
        let cfg = config(&hub, &dir.join("hub"));
        hub.cut_next_cdn.store(true, Ordering::SeqCst);
        let e = resolve_model_path_with("org/tiny", &cfg).unwrap_err().to_string();
        assert!(e.contains("resume"), "{e}");
        let weights = std::fs::read(dir.join("single/model.safetensors")).unwrap();
        let sha = sha256_hex(&weights);
        let partial = dir
            .join("hub/models--org--tiny/blobs")
            .join(format!("{sha}.incomplete"));
        let partial_len = std::fs::metadata(&partial).unwrap().len();
        assert!(
            partial_len > 0 && partial_len < weights.len() as u64,
            "{partial_len}"
        );
        let snapshot = resolve_model_path_with("org/tiny", &cfg).unwrap();
        assert!(
            hub.requests()
                .contains(&format!("/cdn/{sha} [bytes={partial_len}-]")),
            "{:?}",
            hub.requests()
        );
        assert_eq!(
            std::fs::read(snapshot.join("model.safetensors")).unwrap(),
            weights
        );
        assert!(!partial.exists());
        load_model(&snapshot).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Tests that set environment variables hold this (the environment is process-wide).
    static ENV_LOCK: Mutex<()> = Mutex::new(());

    #[test]
    fn hub_environment_variables() {
        let _guard = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let dir = temp_dir("env");
        let hub = fake_hub(&dir);
        let names = [
            "HF_HOME",
            "HF_HUB_CACHE",
            "HUGGINGFACE_HUB_CACHE",
            "HF_ENDPOINT",
            "HF_TOKEN",
            "HUGGING_FACE_HUB_TOKEN",
            "HF_TOKEN_PATH",
            "HF_HUB_OFFLINE",
        ];
        let saved: Vec<_> = names.iter().map(|n| (n, std::env::var_os(n))).collect();
        // SAFETY: ENV_LOCK serialises the tests that touch the environment.
        unsafe {
            for n in names {
                std::env::remove_var(n);
            }
            std::env::set_var("HF_HOME", dir.join("home"));
            std::env::set_var("HF_ENDPOINT", format!("{}/", hub.endpoint));
        }
        let result = std::panic::catch_unwind(|| {
            let snapshot = resolve_model_path("org/tiny").unwrap();
            assert_eq!(
                snapshot,
                dir.join("home/hub/models--org--tiny/snapshots").join(COMMIT_A)
            );
            assert!(load_model_or_download("org/tiny").is_ok());
            // The token file `huggingface-cli login` writes.
            std::fs::write(dir.join("home/token"), "secret\n").unwrap();
            assert!(resolve_model_path("org/gated").is_ok());
            std::fs::remove_file(dir.join("home/token")).unwrap();
            unsafe { std::env::set_var("HF_HUB_OFFLINE", "1") };
            let n = hub.requests().len();
            assert_eq!(resolve_model_path("org/tiny").unwrap(), snapshot);
            let e = resolve_model_path("org/sharded").unwrap_err().to_string();
            assert!(e.contains("HF_HUB_OFFLINE"), "{e}");
            assert_eq!(hub.requests().len(), n);
            unsafe {
                std::env::remove_var("HF_HUB_OFFLINE");
                std::env::set_var("HF_HUB_CACHE", dir.join("other"));
                std::env::set_var("HF_TOKEN", "secret");
            }
            let gated = resolve_model_path("org/gated").unwrap();
            assert!(
                gated.starts_with(dir.join("other/models--org--gated")),
                "{gated:?}"
            );
        });
        unsafe {
            for (n, v) in saved {
                match v {
                    Some(v) => std::env::set_var(n, v),
                    None => std::env::remove_var(n),
                }
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
    }

    #[test]
    fn hub_url_joining() {
        assert_eq!(
            super::net::test_join_url("http://h:1/a/b", "/cdn/x"),
            "http://h:1/cdn/x"
        );
        assert_eq!(
            super::net::test_join_url("http://h:1/a/b", "https://cdn/y"),
            "https://cdn/y"
        );
        assert_eq!(super::net::test_join_url("http://h:1/a/b", "c"), "http://h:1/a/c");
    }
}

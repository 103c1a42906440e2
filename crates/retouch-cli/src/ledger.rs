//! The campaign ledger: what `retouch submit` published, stored next to the outputs so that
//! `retouch watch` knows the campaign's size and every job's source and output, and a repeated
//! or resumed submit skips jobs already published.
//!
//! Layout under the ledger root (default: the campaign's output prefix):
//! `_retouch/campaigns/<campaign>/manifest.json` (`{campaign_id, total, parts, updated_at}`)
//! and one `part-<n>.jsonl` per confirmed chunk of published jobs (`{job_id, source, output}`
//! per line). A part is written only after its jobs are confirmed by the broker.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use retouch_core::job::ObjectUrl;
use retouch_core::store::ObjectStore;
use serde::{Deserialize, Serialize};

/// One published job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Job id.
    pub job_id: String,
    /// Input location.
    pub source: String,
    /// Output location.
    pub output: String,
}

/// `manifest.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The campaign.
    pub campaign_id: String,
    /// Jobs published so far.
    pub total: usize,
    /// Part objects, in order.
    pub parts: Vec<String>,
    /// RFC 3339 time of the last update.
    pub updated_at: String,
}

/// A campaign's ledger in an object store.
pub struct Ledger<'a, O: ObjectStore> {
    store: &'a O,
    dir: String,
    /// The manifest as loaded or last written.
    pub manifest: Manifest,
    /// Every entry, in publication order.
    pub entries: Vec<Entry>,
}

fn url(s: &str) -> anyhow::Result<ObjectUrl> {
    ObjectUrl::parse(s).map_err(|e| anyhow::anyhow!("ledger location: {e}"))
}

impl<'a, O: ObjectStore> Ledger<'a, O> {
    /// Opens (or starts) the ledger of `campaign` under `root` (`s3://bucket/prefix` or
    /// `file:///dir`).
    ///
    /// # Errors
    /// Storage failures other than "not found", or a corrupt ledger.
    pub async fn open(store: &'a O, root: &str, campaign: &str) -> anyhow::Result<Self> {
        let dir = format!("{}/_retouch/campaigns/{campaign}", root.trim_end_matches('/'));
        let manifest_url = url(&format!("{dir}/manifest.json"))?;
        let manifest = match store.get(&manifest_url, 16 << 20).await {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).with_context(|| format!("{manifest_url} is not a campaign manifest"))?
            }
            Err(retouch_core::store::StoreError::NotFound(_)) => {
                Manifest { campaign_id: campaign.to_string(), ..Manifest::default() }
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("cannot read {manifest_url}"))),
        };
        let mut entries = Vec::with_capacity(manifest.total);
        for part in &manifest.parts {
            let part_url = url(&format!("{dir}/{part}"))?;
            let bytes = store.get(&part_url, 1 << 30).await.with_context(|| format!("cannot read {part_url}"))?;
            for line in String::from_utf8_lossy(&bytes).lines().filter(|l| !l.trim().is_empty()) {
                entries.push(serde_json::from_str(line).with_context(|| format!("{part_url}: bad line"))?);
            }
        }
        Ok(Self { store, dir, manifest, entries })
    }

    /// Ids already published.
    pub fn published(&self) -> BTreeSet<&str> {
        self.entries.iter().map(|e| e.job_id.as_str()).collect()
    }

    /// Entries by job id.
    pub fn by_id(&self) -> BTreeMap<&str, &Entry> {
        self.entries.iter().map(|e| (e.job_id.as_str(), e)).collect()
    }

    /// Records a confirmed chunk: writes its part, then the manifest.
    ///
    /// # Errors
    /// Storage failures.
    pub async fn append(&mut self, chunk: Vec<Entry>) -> anyhow::Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        let name = format!("part-{:05}.jsonl", self.manifest.parts.len() + 1);
        let mut body = String::new();
        for e in &chunk {
            body.push_str(&serde_json::to_string(e)?);
            body.push('\n');
        }
        let part_url = url(&format!("{}/{name}", self.dir))?;
        self.store
            .put(&part_url, body.into_bytes(), "application/x-ndjson", &BTreeMap::new())
            .await
            .with_context(|| format!("cannot write {part_url}"))?;
        self.entries.extend(chunk);
        self.manifest.parts.push(name);
        self.manifest.total = self.entries.len();
        self.manifest.updated_at = retouch_core::time::now_rfc3339();
        let manifest_url = url(&format!("{}/manifest.json", self.dir))?;
        self.store
            .put(&manifest_url, serde_json::to_vec_pretty(&self.manifest)?, "application/json", &BTreeMap::new())
            .await
            .with_context(|| format!("cannot write {manifest_url}"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use retouch_worker::local::FsStore;

    use super::*;

    #[tokio::test]
    async fn chunks_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = format!("file://{}", dir.path().display());
        let entry = |i: usize| Entry {
            job_id: format!("c.{i}"),
            source: format!("s3://in/{i}.png"),
            output: format!("s3://out/{i}.png"),
        };
        let mut ledger = Ledger::open(&FsStore, &root, "c").await.expect("new ledger");
        assert_eq!(ledger.manifest.total, 0);
        ledger.append(vec![entry(1), entry(2)]).await.expect("append");
        ledger.append(vec![entry(3)]).await.expect("append");
        let reopened = Ledger::open(&FsStore, &root, "c").await.expect("reopen");
        assert_eq!(reopened.manifest.total, 3);
        assert_eq!(reopened.published().len(), 3);
        assert_eq!(reopened.by_id()["c.3"].source, "s3://in/3.png");
    }
}

//! Job manifests for `retouch batch` and `retouch submit`: one job per JSON line (`.jsonl`)
//! or CSV row (`.csv`), with the protocol's field names. Missing `job_id`s are derived
//! deterministically from the campaign, source, instruction and parameters, so running the
//! same manifest twice produces the same jobs (and no duplicate work).

use std::collections::BTreeMap;
use std::path::Path;

use retouch_core::job::EditJob;
use retouch_core::params::EditParams;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::cli_error::bad_input;

/// Extensions of the image files that `retouch batch --input-dir` and `retouch submit --source`
/// pick up (compared in lower case).
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff"];

/// One manifest entry: a job whose `job_id` and `instruction` may be left to defaults.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Row {
    /// Optional explicit id.
    #[serde(default)]
    pub job_id: Option<String>,
    /// Input location (`s3://…` for submit; a path for batch).
    pub source: String,
    /// The instruction; falls back to `--instruction`.
    #[serde(default)]
    pub instruction: Option<String>,
    /// Output location.
    #[serde(default)]
    pub output: Option<String>,
    /// Campaign; falls back to `--campaign`.
    #[serde(default)]
    pub campaign_id: Option<String>,
    /// Parameters; each falls back to the command-line flags.
    #[serde(default)]
    pub params: EditParams,
    /// Echoed in the result.
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// Reads a `.jsonl` or `.csv` manifest.
///
/// # Errors
/// Bad input naming the line and the problem.
pub fn read(path: &Path) -> anyhow::Result<Vec<Row>> {
    let text = std::fs::read_to_string(path).map_err(|e| bad_input(format!("--manifest {}: {e}", path.display())))?;
    let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "jsonl" | "ndjson" | "json" => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, line)| {
                serde_json::from_str(line).map_err(|e| bad_input(format!("{}:{}: {e}", path.display(), i + 1)))
            })
            .collect(),
        "csv" => read_csv(path, &text),
        _ => Err(bad_input(format!("--manifest {}: use a .jsonl or .csv file", path.display()))),
    }
}

/// CSV columns: `source` (required), `job_id`, `instruction`, `output`, `campaign_id`, the
/// parameter names (`steps`, `guidance_scale`, …) and `metadata.<key>` columns.
fn read_csv(path: &Path, text: &str) -> anyhow::Result<Vec<Row>> {
    let mut reader = csv::ReaderBuilder::new().trim(csv::Trim::All).from_reader(text.as_bytes());
    let headers = reader.headers().map_err(|e| bad_input(format!("{}: {e}", path.display())))?.clone();
    if !headers.iter().any(|h| h == "source") {
        return Err(bad_input(format!("{}: the header has no `source` column", path.display())));
    }
    let mut rows = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let line = i + 2;
        let record = record.map_err(|e| bad_input(format!("{}:{line}: {e}", path.display())))?;
        let mut job = serde_json::Map::new();
        let mut params = serde_json::Map::new();
        let mut metadata = serde_json::Map::new();
        for (header, value) in headers.iter().zip(record.iter()) {
            if value.is_empty() {
                continue;
            }
            let json_value =
                || value.parse::<serde_json::Value>().unwrap_or_else(|_| serde_json::Value::String(value.into()));
            match header {
                "job_id" | "source" | "instruction" | "output" | "campaign_id" => {
                    job.insert(header.into(), serde_json::Value::String(value.into()));
                }
                "scheduler" | "format" | "negative_prompt" => {
                    params.insert(header.into(), serde_json::Value::String(value.into()));
                }
                "steps"
                | "guidance_scale"
                | "image_guidance_scale"
                | "seed"
                | "max_side"
                | "quality"
                | "karras_sigmas" => {
                    params.insert(header.into(), json_value());
                }
                other => match other.strip_prefix("metadata.") {
                    Some(key) => {
                        metadata.insert(key.into(), serde_json::Value::String(value.into()));
                    }
                    None => return Err(bad_input(format!("{}: unknown column `{other}`", path.display()))),
                },
            }
        }
        job.insert("params".into(), serde_json::Value::Object(params));
        if !metadata.is_empty() {
            job.insert("metadata".into(), serde_json::Value::Object(metadata));
        }
        rows.push(
            serde_json::from_value(serde_json::Value::Object(job))
                .map_err(|e| bad_input(format!("{}:{line}: {e}", path.display())))?,
        );
    }
    Ok(rows)
}

/// A stable job id: `<campaign>.<20 hex digits>` of the SHA-256 of campaign, source,
/// instruction and parameters.
pub fn derived_job_id(campaign: &str, source: &str, instruction: &str, params: &EditParams) -> String {
    let mut hash = Sha256::new();
    for part in [campaign, source, instruction, &serde_json::to_string(params).unwrap_or_default()] {
        hash.update(part.as_bytes());
        hash.update([0u8]);
    }
    let digest = hash.finalize();
    let hex: String = digest.iter().take(10).map(|b| format!("{b:02x}")).collect();
    format!("{campaign}.{hex}")
}

/// Fills a row's gaps from the command line and returns the protocol job.
///
/// # Errors
/// Bad input when no instruction is available.
pub fn to_job(
    row: Row,
    campaign: Option<&str>,
    instruction: Option<&str>,
    defaults: &EditParams,
) -> anyhow::Result<EditJob> {
    let instruction = row
        .instruction
        .or_else(|| instruction.map(str::to_string))
        .ok_or_else(|| bad_input(format!("{}: no instruction (give one per row or --instruction)", row.source)))?;
    let campaign_id = row.campaign_id.or_else(|| campaign.map(str::to_string));
    let params = merge(&row.params, defaults);
    let job_id = row
        .job_id
        .unwrap_or_else(|| derived_job_id(campaign_id.as_deref().unwrap_or("job"), &row.source, &instruction, &params));
    Ok(EditJob {
        job_id,
        source: row.source,
        instruction,
        output: row.output,
        campaign_id,
        params,
        metadata: row.metadata,
        priority: None,
        events: None,
        webhook: None,
    })
}

/// Row parameters, each falling back to the command line's.
pub fn merge(row: &EditParams, defaults: &EditParams) -> EditParams {
    EditParams {
        steps: row.steps.or(defaults.steps),
        guidance_scale: row.guidance_scale.or(defaults.guidance_scale),
        image_guidance_scale: row.image_guidance_scale.or(defaults.image_guidance_scale),
        negative_prompt: row.negative_prompt.clone().or_else(|| defaults.negative_prompt.clone()),
        seed: row.seed.or(defaults.seed),
        scheduler: row.scheduler.or(defaults.scheduler),
        karras_sigmas: row.karras_sigmas.or(defaults.karras_sigmas),
        max_side: row.max_side.or(defaults.max_side),
        format: row.format.or(defaults.format),
        quality: row.quality.or(defaults.quality),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_are_stable_and_depend_on_every_input() {
        let p = EditParams::default();
        let a = derived_job_id("c1", "s3://b/x.png", "snow", &p);
        assert_eq!(a, derived_job_id("c1", "s3://b/x.png", "snow", &p));
        assert!(a.starts_with("c1.") && a.len() == 23, "{a}");
        assert_ne!(a, derived_job_id("c1", "s3://b/y.png", "snow", &p));
        assert_ne!(a, derived_job_id("c1", "s3://b/x.png", "rain", &p));
        assert_ne!(a, derived_job_id("c1", "s3://b/x.png", "snow", &EditParams { steps: Some(9), ..p }));
    }

    #[test]
    fn csv_rows_map_to_protocol_fields() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("m.csv");
        std::fs::write(
            &path,
            "source,instruction,steps,scheduler,karras_sigmas,negative_prompt,metadata.sku\n\
             s3://b/a.png,make it red,12,unipc,true,\"blurry, dark\",A-1\ns3://b/b.png,,,,,,\n",
        )
        .expect("write");
        let rows = read(&path).expect("reads");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].params.steps, Some(12));
        assert_eq!(rows[0].params.scheduler, Some(retouch_core::params::SchedulerKind::Unipc));
        assert_eq!(rows[0].params.karras_sigmas, Some(true));
        assert_eq!(rows[0].params.negative_prompt.as_deref(), Some("blurry, dark"));
        let defaults =
            EditParams { negative_prompt: Some("grainy".into()), karras_sigmas: Some(false), ..Default::default() };
        let merged = merge(&rows[0].params, &defaults);
        assert_eq!((merged.negative_prompt.as_deref(), merged.karras_sigmas), (Some("blurry, dark"), Some(true)));
        let merged = merge(&rows[1].params, &defaults);
        assert_eq!((merged.negative_prompt.as_deref(), merged.karras_sigmas), (Some("grainy"), Some(false)));
        assert_eq!(rows[0].metadata.as_ref().expect("metadata")["sku"], "A-1");
        let job = to_job(rows[1].clone(), Some("c"), Some("default"), &EditParams::default()).expect("job");
        assert_eq!(job.instruction, "default");
        std::fs::write(&path, "source,colour\ns3://b/a.png,red\n").expect("write");
        assert!(read(&path).expect_err("unknown column").to_string().contains("colour"));
    }
}

#[cfg(test)]
mod properties {
    //! Manifests from arbitrary text: rows or a clear error, never a panic.

    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_manifests_read_or_fail_typed(
            lines in prop::collection::vec(prop_oneof![
                ".{0,60}",
                Just(r#"{"source":"s3://in/a.png","instruction":"x"}"#.to_string()),
                Just("source,instruction,steps".to_string()),
                Just("s3://in/b.png,make it snowy,4".to_string()),
            ], 0..6),
            csv in any::<bool>(),
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join(if csv { "jobs.csv" } else { "jobs.jsonl" });
            std::fs::write(&path, lines.join("\n")).expect("write");
            if let Ok(rows) = read(&path) {
                for row in rows {
                    let _ = to_job(row, Some("c"), Some("x"), &EditParams::default());
                }
            }
        }
    }
}

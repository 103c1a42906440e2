//! The worker images (`deploy/docker/Dockerfile.cpu`, `Dockerfile.cuda`) run as containers, the
//! way the Helm chart runs them: non-root, read-only root filesystem, every capability dropped,
//! the model from a mounted cache. `deploy/docker/smoke.sh` builds the images' run-time stages
//! and runs these tests (`--ignored`) with their tags in `RETOUCH_TEST_IMAGE_CPU` and
//! `RETOUCH_TEST_IMAGE_CUDA`; they need a Docker engine, so a plain `cargo test` leaves them out.
//! Run through the script, a missing variable fails the test.

use std::process::Command;
use std::time::{Duration, Instant};

use retouch_core::job::Status;
use retouch_e2e::{Broker, Env, S3Server, Worker, test_png, unique, wait_for};
use serde_json::json;

/// The chart's `terminationGracePeriodSeconds`: a worker must be gone within it after SIGTERM.
const CHART_GRACE: Duration = Duration::from_secs(180);

fn required(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: these tests run through deploy/docker/smoke.sh, which builds the image")
    })
}

fn setup(test: &str, inputs: usize) -> (String, S3Server, Broker) {
    let env = Env::get();
    let name = unique(test);
    let s3 = S3Server::start(&env, &name, &["inputs", "outputs"]);
    for i in 0..inputs {
        s3.put("inputs", &format!("img{i}.png"), &test_png(i as u8 * 29));
    }
    let broker = Broker::new(&env.amqp_url, &name, 5);
    (name, s3, broker)
}

fn job(id: &str, source: usize, steps: u32) -> serde_json::Value {
    json!({"job_id": id, "source": format!("s3://inputs/img{source}.png"), "instruction": "make it snowy",
           "params": {"steps": steps}})
}

#[test]
#[ignore = "needs a Docker engine and the image deploy/docker/smoke.sh builds (the script runs it)"]
fn cpu_image_edits_jobs_as_the_chart_runs_it_and_drains_on_sigterm() {
    let image = required("RETOUCH_TEST_IMAGE_CPU");
    let (name, s3, mut broker) = setup("container-cpu", 4);
    let started = Instant::now();
    let mut worker = Worker::start_container(&image, &name, &broker.worker_env(5), &s3, &[], &[]);
    worker.wait_ready();
    eprintln!("container start to /readyz 200: {:.2} s ({image})", started.elapsed().as_secs_f64());
    assert_eq!(worker.get("/healthz").map(|(code, _)| code), Some(200));

    // As the chart runs it: uid 10001, nothing writable but /tmp and the cache volume.
    let (code, uid) = worker.exec(&["id", "-u"]);
    assert_eq!((code, uid.trim()), (0, "10001"), "the worker runs as the image's retouch user");
    let (code, out) = worker.exec(&["touch", "/usr/local/bin/written"]);
    assert_ne!(code, 0, "the root filesystem is writable: {out}");
    assert!(out.contains("Read-only file system"), "{out}");
    assert_eq!(worker.exec(&["touch", "/tmp/scratch"]).0, 0, "/tmp (the chart's emptyDir) is writable");
    // The image ships oneDNN, so the model runs on it (not the crate's fallback kernels).
    let logs = worker.logs();
    assert!(logs.contains("conv=onednn-f32"), "the worker does not run oneDNN's kernels:\n{logs}");

    for i in 0..3 {
        broker.publish_json(&job(&format!("ctr-{i}"), i, 4));
    }
    let results = broker.results_in_order(3, Duration::from_secs(180));
    for result in &results {
        assert_eq!(result.status, Status::Succeeded, "{result:?}\n{}", worker.logs());
        let url = result.output.as_deref().expect("output");
        let key = url.strip_prefix("s3://outputs/").expect("under the output prefix");
        let bytes = s3.get("outputs", key).unwrap_or_else(|| panic!("{url} is missing"));
        let output = image::load_from_memory(&bytes).expect("the output decodes");
        assert_eq!((output.width(), output.height()), (64, 64), "{url}");
    }

    // SIGTERM to PID 1 while a job runs: the job finishes, its result is published, exit 0.
    let batches = worker.metric("retouch_batch_size_count").unwrap_or(0.0);
    broker.publish_json(&job("ctr-drain", 3, 40));
    wait_for("the last job to reach the model", Duration::from_secs(60), || {
        worker.metric("retouch_batch_size_count").filter(|n| *n > batches)
    });
    let signalled = Instant::now();
    let status = worker.terminate(CHART_GRACE);
    eprintln!("SIGTERM to exit with a job running: {:.2} s", signalled.elapsed().as_secs_f64());
    assert_eq!(status.code(), Some(0), "{}", worker.logs());
    let drained = broker.results_in_order(1, Duration::from_secs(30));
    assert_eq!((drained[0].job_id.as_str(), drained[0].status), ("ctr-drain", Status::Succeeded), "{drained:?}");
}

/// `docker run --rm IMAGE ARGS…`: `(exit code, stdout + stderr)`.
fn docker_run(docker_args: &[&str], image: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new("docker")
        .args(["run", "--rm", "--network=host"])
        .args(docker_args)
        .arg(image)
        .args(args)
        .output()
        .expect("docker run");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[test]
#[ignore = "needs a Docker engine and the image deploy/docker/smoke.sh builds (the script runs it)"]
fn cuda_image_resolves_its_libraries_and_without_a_gpu_names_the_missing_device() {
    let image = required("RETOUCH_TEST_IMAGE_CUDA");
    // A libcuda.so.1 whose every call answers CUDA_ERROR_NO_DEVICE: the driver library of a
    // machine without a GPU (the NVIDIA container runtime mounts the real one).
    let no_gpu_driver = required("RETOUCH_TEST_NO_GPU_DRIVER");

    // Every library resolves inside the image but the driver's.
    let (code, ldd) = docker_run(&["--entrypoint=ldd"], &image, &["/usr/local/bin/retouch"]);
    assert_eq!(code, 0, "{ldd}");
    let missing: Vec<&str> =
        ldd.lines().filter(|l| l.contains("not found")).filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(missing, ["libcuda.so.1"], "libraries missing from the image:\n{ldd}");
    for lib in ["libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10"] {
        assert!(ldd.contains(&format!("{lib} => /")), "{lib} does not resolve:\n{ldd}");
    }

    // Without the NVIDIA runtime the binary cannot start at all: the loader says which library.
    let (code, bare) = docker_run(&[], &image, &["--help"]);
    assert_ne!(code, 0, "{bare}");
    assert!(bare.contains("libcuda.so.1"), "{bare}");

    // With a driver library and no GPU: --help works, the worker names the missing device.
    let driver_mount = format!("--volume={no_gpu_driver}:/opt/no-gpu-driver:ro");
    let driver_args = [driver_mount.as_str(), "--env=LD_LIBRARY_PATH=/opt/no-gpu-driver"];
    let (code, help) = docker_run(&driver_args, &image, &["--help"]);
    assert_eq!(code, 0, "{help}");
    assert!(help.contains("worker"), "{help}");

    let (name, s3, broker) = setup("container-cuda", 0);
    let mut worker = Worker::start_container(&image, &name, &broker.worker_env(5), &s3, &[], &driver_args);
    let status = worker.wait_exit(Duration::from_secs(60));
    let logs = worker.logs();
    assert_ne!(status.code(), Some(0), "{logs}");
    assert!(logs.contains("device = \"cuda\""), "the image's config selects the GPU:\n{logs}");
    assert!(logs.contains("cannot open cuda:0"), "{logs}");
    assert!(logs.contains("CUDA_ERROR_NO_DEVICE"), "{logs}");
}

//! `datamux serve` end to end: a model of several widths trained at the smoke profile, served on
//! a free loopback port, good and bad requests with their status codes, `datamux predict` on the
//! same folder, and SIGTERM stopping the server with exit 0. Every loop is bounded in count
//! and time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{command, datamux, mirror, root, stderr, workspace};

/// Train the smoke profile of `experiments/serve/<name>.toml` in `dir` and return its model.
fn train(dir: &Path, name: &str) -> PathBuf {
    std::fs::create_dir_all(dir.join("experiments/serve")).unwrap();
    let file = format!("experiments/serve/{name}.toml");
    std::fs::copy(root().join(&file), dir.join(&file)).unwrap();
    let out = datamux(
        dir,
        &[
            "run",
            &file,
            "--profile",
            "smoke",
            "--data-dir",
            &mirror(),
            "--out",
            "out",
            "--no-speed",
            "--no-report",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    model_dir(dir, name)
}

/// The one finished run folder of `experiment` under `dir/runs/`.
fn model_dir(dir: &Path, experiment: &str) -> PathBuf {
    let runs = dir.join("runs").join(experiment);
    let found: Vec<PathBuf> = std::fs::read_dir(&runs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("datamux.json").is_file())
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    found[0].clone()
}

/// A server on a free port (`127.0.0.1:0`) and the address its first line names.
fn start(dir: &Path, model: &Path, extra: &[&str]) -> (Child, String) {
    let model = model.display().to_string();
    let mut args = vec!["serve", "--model", &model, "--addr", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let mut child = command(dir, &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .rsplit("http://")
        .next()
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    assert!(addr.starts_with("127.0.0.1:"), "first line: {line}");
    (child, addr)
}

/// A POST of `body` to `path`: (status, Retry-After present, JSON answer).
fn post(
    rt: &tokio::runtime::Runtime,
    addr: &str,
    path: &str,
    body: String,
) -> (u16, bool, serde_json::Value) {
    rt.block_on(async {
        let r = reqwest::Client::new()
            .post(format!("http://{addr}{path}"))
            .header("content-type", "application/json")
            .body(body)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let retry = r.headers().contains_key("retry-after");
        let text = r.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        (status, retry, v)
    })
}

fn get(rt: &tokio::runtime::Runtime, addr: &str, path: &str) -> (u16, String) {
    rt.block_on(async {
        let r = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    })
}

/// SIGTERM, then the exit status within 30 s.
fn stop(mut child: Child) -> std::process::ExitStatus {
    let pid = child.id().to_string();
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(ok.success());
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_text_model_of_several_widths_is_served_and_refuses_bad_requests() {
    let ws = workspace();
    let dir = ws.path();
    let model = train(dir, "serve-text");
    let rows: Vec<datamux_runner::results::AccuracyRow> =
        datamux_runner::results::read_table(&dir.join("out/serve-text/accuracy.parquet")).unwrap();
    // One row per served N of the one checkpoint.
    let mut ns: Vec<i64> = rows
        .iter()
        .filter(|r| r.split == "test" && r.metric == "accuracy")
        .map(|r| r.id.n_instances)
        .collect();
    ns.sort_unstable();
    assert_eq!(ns, [1, 2]);
    assert!(rows.iter().all(|r| r.id.model_size.ends_with(" serve1-2")));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (child, addr) = start(dir, &model, &["--policy", "adaptive", "--max-inputs", "4"]);
    let (status, health) = get(&rt, &addr, "/health");
    assert_eq!(status, 200);
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["serve_n"], serde_json::json!([1, 2]));
    assert_eq!(health["policy"], "adaptive");

    let good = r#"{"inputs": ["a fine and moving film", "dull , flat and far too long", "an over-long text that the tokenizer truncates to the model's own max_length of twenty four tokens, as in training, rather than refusing it or failing"]}"#;
    let (status, _, v) = post(&rt, &addr, "/v1/classify", good.to_string());
    assert_eq!(status, 200, "{v}");
    let outputs = v["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 3);
    for o in outputs {
        let p: Vec<f64> = serde_json::from_value(o["probabilities"].clone()).unwrap();
        assert_eq!(p.len(), health["labels"].as_array().unwrap().len());
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-4);
        let label = o["label"].as_u64().unwrap() as usize;
        assert_eq!(o["name"], health["labels"][label]);
    }

    // Each bad request: its status and a one-line JSON error; the server keeps serving.
    let bad = [
        ("{not json", 400, "not JSON"),
        (r#"{"inputs": []}"#, 400, "empty"),
        (r#"{"texts": ["a"]}"#, 400, "needs `inputs`"),
        (r#"{"inputs": [3]}"#, 400, "must be a string"),
        (r#"{"inputs": ["  "]}"#, 422, "empty text"),
        (r#"{"inputs": ["a", "b", "c", "d", "e"]}"#, 413, "at most 4"),
    ];
    for (body, want, says) in bad {
        let (status, _, v) = post(&rt, &addr, "/v1/classify", body.to_string());
        assert_eq!(status, want, "{body}: {v}");
        let msg = v["error"].as_str().unwrap_or_default();
        assert!(msg.contains(says) && !msg.contains('\n'), "{body}: {msg}");
    }
    let (status, _, v) = post(&rt, &addr, "/v1/embed", good.to_string());
    assert_eq!(status, 404, "{v}");
    let huge = format!(r#"{{"inputs": ["{}"]}}"#, "a ".repeat(3 << 20));
    let (status, _, _) = post(&rt, &addr, "/v1/classify", huge);
    assert_eq!(status, 413);
    let (status, _, v) = post(&rt, &addr, "/v1/classify", good.to_string());
    assert_eq!(status, 200, "still serving: {v}");

    let (status, metrics) = get(&rt, &addr, "/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("datamux_requests_total"), "{metrics}");
    assert!(metrics.contains("datamux_batches_total{n=\""), "{metrics}");
    assert!(metrics.contains("datamux_loop_busy_ratio "), "{metrics}");
    assert!(
        metrics.contains("datamux_runtime_lag_seconds "),
        "{metrics}"
    );
    assert!(
        metrics.contains("datamux_request_latency_seconds_bucket"),
        "{metrics}"
    );
    assert!(stop(child).success());

    // A full queue answers 503 with Retry-After at once: under fixed:2 a lone request waits
    // (up to the 3 s budget) for its row to fill, so with a queue of 1 the next is refused.
    let (child, addr) = start(
        dir,
        &model,
        &[
            "--queue",
            "1",
            "--policy",
            "fixed:2",
            "--max-delay-ms",
            "3000",
        ],
    );
    let (first, second) = rt.block_on(async {
        let client = reqwest::Client::new();
        let url = format!("http://{addr}/v1/classify");
        let send = |c: reqwest::Client, url: String| async move {
            let r = c
                .post(url)
                .body(r#"{"inputs": ["a fine and moving film"]}"#)
                .timeout(Duration::from_secs(30))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.headers().contains_key("retry-after"))
        };
        let waiting = tokio::spawn(send(client.clone(), url.clone()));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let refused = send(client, url).await;
        (waiting.await.unwrap(), refused)
    });
    assert_eq!(second, (503, true), "the second request, the queue full");
    assert_eq!(
        first,
        (200, false),
        "the first, answered once its wait ran out"
    );
    assert!(stop(child).success());

    // `predict` answers the same folder from a file, one JSON line per input.
    std::fs::write(
        dir.join("in.txt"),
        "a fine and moving film\n\ndull , flat\n",
    )
    .unwrap();
    let m = model.display().to_string();
    let out = datamux(
        dir,
        &["predict", "--model", &m, "--input", "in.txt", "--n", "1"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["label"], outputs[0]["label"]);
    let out = datamux(
        dir,
        &["predict", "--model", &m, "--input", "in.txt", "--n", "3"],
    );
    assert!(
        stderr(&out).contains("serves N in [1, 2], not 3"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_image_model_answers_a_png_and_refuses_what_does_not_decode() {
    let ws = tempfile::tempdir().unwrap();
    let dir = ws.path();
    let model = train(dir, "serve-mnist");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (child, addr) = start(dir, &model, &[]);
    let png = |w: u32| {
        let img = image::GrayImage::from_fn(w, w, |x, y| image::Luma([((x * y) % 256) as u8]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, out.into_inner())
    };
    let body = format!(r#"{{"inputs": ["{}", "{}"]}}"#, png(28), png(30));
    let (status, _, v) = post(&rt, &addr, "/v1/classify", body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["outputs"].as_array().unwrap().len(), 2);
    for (body, want, says) in [
        (
            r#"{"inputs": ["not base64!"]}"#.to_string(),
            400,
            "not base64",
        ),
        (
            r#"{"inputs": ["aGVsbG8="]}"#.to_string(),
            422,
            "cannot decode image",
        ),
        (
            format!(r#"{{"inputs": ["{}"]}}"#, png(9)),
            422,
            "smaller than the 28x28 crop",
        ),
    ] {
        let (status, _, v) = post(&rt, &addr, "/v1/classify", body);
        assert_eq!(status, want, "{v}");
        assert!(
            v["error"].as_str().unwrap_or_default().contains(says),
            "{v}"
        );
    }
    assert!(stop(child).success());
}

#[test]
fn a_folder_that_is_not_a_model_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = datamux(
        dir.path(),
        &["serve", "--model", ".", "--addr", "127.0.0.1:0"],
    );
    assert_eq!(out.status.code(), Some(2));
    let e = stderr(&out);
    assert!(
        e.contains("has no datamux.json") && e.lines().count() == 1,
        "{e}"
    );
}

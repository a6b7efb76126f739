//! Pretrained text backbones through the runner: a model that cannot be had, a broken folder
//! and a non-BERT config are table rows with one-line reasons, never a panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use datamux_runner::results::{self, AccuracyRow, Status};

use common::{datamux, mirror, stderr, workspace};

/// A pretrained model that cannot be had offline is an `unavailable` row with a one-line reason;
/// a folder without `config.json` and a non-BERT config are `error` rows naming the file; a models
/// folder that does not exist stops the command up front. Never a panic.
#[test]
fn bad_pretrained_values_are_rows_or_one_line_errors() {
    let ws = workspace();
    let dir = ws.path();
    let models = dir.join("models");
    std::fs::create_dir_all(models.join("acme/no-config")).unwrap();
    std::fs::create_dir_all(models.join("acme/gpt")).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::write(models.join("acme/no-config").join(f), "{}").unwrap();
        std::fs::write(models.join("acme/gpt").join(f), "{}").unwrap();
    }
    std::fs::remove_file(models.join("acme/no-config/config.json")).unwrap();
    std::fs::write(
        models.join("acme/gpt/config.json"),
        r#"{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}"#,
    )
    .unwrap();
    let cases = [
        ("acme/not-anywhere", Status::Unavailable, "not found"),
        ("acme/no-config", Status::Error, "config.json"),
        ("acme/gpt", Status::Error, "`gpt2`"),
    ];
    for (i, (repo, status, part)) in cases.iter().enumerate() {
        let name = format!("bad{i}");
        let file = dir.join(format!("experiments/{name}.toml"));
        std::fs::write(
            &file,
            format!(
                "name = \"{name}\"\nmodality = \"text\"\n[data]\ndataset = \"rt-snippets\"\n\
                 [model]\nbackbone = \"transformer\"\n[model.text]\npretrained = \"{repo}\"\n\
                 [sweep]\nn_instances = [1]\n[profile.smoke]\ndata = {{ train_limit = 50, \
                 validation_holdout = 20, eval_limit = 20 }}\ntrain = {{ steps = 2, batch_size = 4 }}\n\
                 warmup = {{ steps = 2, batch_size = 4 }}\n"
            ),
        )
        .unwrap();
        let o = datamux(
            dir,
            &[
                "run",
                &format!("experiments/{name}.toml"),
                "--profile",
                "smoke",
                "--out",
                "results",
                "--no-speed",
                "--data-dir",
                &mirror(),
                "--models-dir",
                &models.display().to_string(),
            ],
        );
        let e = stderr(&o);
        assert!(!e.contains("panicked"), "{repo}: {e}");
        let acc: Vec<AccuracyRow> =
            results::read_table(&dir.join(format!("results/{name}/accuracy.parquet"))).unwrap();
        assert!(!acc.is_empty(), "{repo}: no rows; {e}");
        for r in &acc {
            assert_eq!(r.id.status, *status, "{repo}: {}", r.id.error);
            assert!(
                r.id.error.contains(repo)
                    && r.id.error.contains(part)
                    && !r.id.error.contains('\n'),
                "{repo}: {}",
                r.id.error
            );
        }
    }
    let o = datamux(
        dir,
        &["check", "experiments", "--models-dir", "/no/such/models"],
    );
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.trim().lines().count() == 1 && e.contains("/no/such/models"),
        "{e}"
    );
}

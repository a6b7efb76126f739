//! The catalogue's two data paths (local mirror, hf-hub cache) on the committed fixtures, and
//! every error a user can trip over.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use datamux_data::read;
use datamux_data::{Catalogue, DataError, Examples, Resolver, Source};
use polars::prelude::{Column, DataFrame, IntoColumn, NamedFrom, ParquetWriter, Series};

fn mirror() -> PathBuf {
    // Read at run time: a test binary built from another checkout that shares the target folder
    // (CI) would otherwise look in that checkout.
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR"))
        .join("../../fixtures/mirror")
}

fn local(dir: &Path) -> Resolver {
    Resolver::new(
        Some(dir.to_path_buf()),
        "test",
        PathBuf::from("/nonexistent-hub-cache"),
        true,
    )
    .unwrap()
}

#[test]
fn local_mirror_reads_every_kind() -> Result<(), DataError> {
    let cat = Catalogue::builtin()?;
    let r = local(&mirror());
    let mnist = read::load(&cat, &r, "mnist", "train")?;
    assert_eq!(mnist.len(), 600);
    assert!(matches!(mnist.source, Source::Local { .. }));
    let Examples::Images { images, labels } = &mnist.examples else {
        panic!("not images")
    };
    assert_eq!(&images[0][1..4], b"PNG");
    assert!(labels.iter().all(|l| *l < 10));
    let rt = read::load(&cat, &r, "rt-snippets", "validation")?;
    let Examples::Text {
        texts,
        pairs,
        labels,
    } = &rt.examples
    else {
        panic!("not text")
    };
    assert_eq!((texts.len(), pairs.is_none()), (100, true));
    assert!(labels.contains(&0) && labels.contains(&1));
    let wnut = read::load(&cat, &r, "wnut16", "test")?;
    assert_eq!(wnut.label_names.len(), 21);
    assert_eq!(wnut.label_names[3], "B-facility");
    let Examples::Tokens { tokens, tags } = &wnut.examples else {
        panic!("not tokens")
    };
    assert_eq!(tokens.len(), 50);
    assert!(tokens.iter().zip(tags).all(|(t, g)| t.len() == g.len()));
    let cifar = read::load(&cat, &r, "cifar10_sample", "test")?;
    assert_eq!(cifar.len(), 20);
    Ok(())
}

/// Build the hf-hub cache layout by hand: `datasets--ORG--NAME/refs/<rev>` holding a commit id,
/// `snapshots/<commit>/<file>` holding the file.
fn fake_hub_cache(root: &Path, repo: &str, revision: &str, files: &[(&str, &Path)]) {
    let dir = root.join(format!("datasets--{}", repo.replace('/', "--")));
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(dir.join("refs")).unwrap();
    std::fs::write(dir.join("refs").join(revision), commit).unwrap();
    for (name, src) in files {
        let dst = dir.join("snapshots").join(commit).join(name);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(src, dst).unwrap();
    }
}

#[test]
fn hub_path_resolves_from_the_cache_offline() -> Result<(), DataError> {
    let tmp = tempfile::tempdir().unwrap();
    fake_hub_cache(
        tmp.path(),
        "ylecun/mnist",
        "main",
        &[(
            "mnist/test-00000-of-00001.parquet",
            &mirror().join("mnist/test.parquet"),
        )],
    );
    let cat = Catalogue::builtin()?;
    let r = Resolver::new(None, "test", tmp.path().to_path_buf(), true)?;
    let split = read::load(&cat, &r, "mnist", "test")?;
    assert_eq!(split.len(), 200);
    assert_eq!(split.source.describe(), "hub:ylecun/mnist@main");
    // The train split is not in the cache and downloads are off: a clear error, not a fetch.
    let err = read::load(&cat, &r, "mnist", "train")
        .expect_err("resolved a missing file")
        .to_string();
    assert!(err.contains("mnist/train-00000-of-00001.parquet"), "{err}");
    assert!(
        err.contains("DATAMUX_DATA_DIR") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
    Ok(())
}

#[test]
fn the_local_mirror_wins_over_the_cache() -> Result<(), DataError> {
    let tmp = tempfile::tempdir().unwrap();
    fake_hub_cache(
        tmp.path(),
        "ylecun/mnist",
        "main",
        &[(
            "mnist/test-00000-of-00001.parquet",
            &mirror().join("mnist/test.parquet"),
        )],
    );
    let r = Resolver::new(Some(mirror()), "test", tmp.path().to_path_buf(), true)?;
    let split = read::load(&Catalogue::builtin()?, &r, "mnist", "test")?;
    assert!(split.source.describe().starts_with("local:"));
    Ok(())
}

#[test]
fn unavailable_data_errors_name_what_was_looked_for() -> Result<(), DataError> {
    let cat = Catalogue::builtin()?;
    let err = Resolver::new(
        Some("/no/such/dir".into()),
        "DATAMUX_DATA_DIR",
        "/x".into(),
        true,
    )
    .expect_err("accepted");
    assert!(matches!(err, DataError::NoDataDir { .. }));
    assert!(
        err.to_string().contains("/no/such/dir") && err.to_string().contains("DATAMUX_DATA_DIR")
    );
    let r = local(&mirror());
    let err = read::load(&cat, &r, "sst2", "train")
        .expect_err("sst2 is not in the fixtures")
        .to_string();
    assert!(
        err.contains("sst2") && err.contains("nyu-mll/glue"),
        "{err}"
    );
    let err = read::load(&cat, &r, "mnist", "validation")
        .expect_err("mnist has no validation")
        .to_string();
    assert!(
        err.contains("no split `validation`") && err.contains("test, train"),
        "{err}"
    );
    let err = read::load(&cat, &r, "imagenet", "train")
        .expect_err("unknown dataset")
        .to_string();
    assert!(err.contains("unknown dataset `imagenet`"), "{err}");
    Ok(())
}

fn write(dir: &Path, folder: &str, file: &str, columns: Vec<Column>) {
    let mut df = DataFrame::new_infer_height(columns).unwrap();
    std::fs::create_dir_all(dir.join(folder)).unwrap();
    let f = std::fs::File::create(dir.join(folder).join(file)).unwrap();
    ParquetWriter::new(f).finish(&mut df).unwrap();
}

fn one_dataset(kind: &str, columns: &str) -> Catalogue {
    let text = format!(
        r#"[[dataset]]
name = "bad"
kind = "{kind}"
columns = {columns}
labels = ["a", "b"]
local = {{ folder = "bad", files = {{ train = ["train.parquet"] }} }}"#
    );
    Catalogue::parse(&text, "test").unwrap()
}

#[test]
fn bad_files_give_errors_naming_column_row_and_path() {
    let tmp = tempfile::tempdir().unwrap();
    let r = local(tmp.path());
    let text_cat = one_dataset(
        "text_classification",
        r#"{ text = "text", label = "label" }"#,
    );
    let text = |v: &[&str]| Series::new("text".into(), v).into_column();
    let label = |v: &[i64]| Series::new("label".into(), v).into_column();

    write(tmp.path(), "bad", "train.parquet", vec![text(&["x", "y"])]);
    let e = read::load(&text_cat, &r, "bad", "train")
        .expect_err("missing column")
        .to_string();
    assert!(
        e.contains("no column `label`") && e.contains("train.parquet"),
        "{e}"
    );

    write(
        tmp.path(),
        "bad",
        "train.parquet",
        vec![
            text(&["x", "y"]),
            Series::new("label".into(), &["1", "0"]).into_column(),
        ],
    );
    let e = read::load(&text_cat, &r, "bad", "train")
        .expect_err("string labels")
        .to_string();
    assert!(
        e.contains("column `label`") && e.contains("expected integer"),
        "{e}"
    );

    write(
        tmp.path(),
        "bad",
        "train.parquet",
        vec![text(&["x", "y", "z"]), label(&[0, 1, 7])],
    );
    let e = read::load(&text_cat, &r, "bad", "train")
        .expect_err("label 7 of 2")
        .to_string();
    assert!(
        e.contains("row 2") && e.contains("label 7") && e.contains("0..2"),
        "{e}"
    );

    write(
        tmp.path(),
        "bad",
        "train.parquet",
        vec![text(&[]), label(&[])],
    );
    let e = read::load(&text_cat, &r, "bad", "train")
        .expect_err("empty")
        .to_string();
    assert!(e.contains("has no rows"), "{e}");

    // Bytes that are not UTF-8 can only be stored as binary; a text column must be a string.
    let bytes = Series::new("text".into(), [&[0xffu8, 0xfe, 0x41][..], &b"ok"[..]]).into_column();
    write(
        tmp.path(),
        "bad",
        "train.parquet",
        vec![bytes, label(&[0, 1])],
    );
    let e = read::load(&text_cat, &r, "bad", "train")
        .expect_err("binary text")
        .to_string();
    assert!(
        e.contains("column `text`") && e.contains("expected string"),
        "{e}"
    );

    std::fs::write(tmp.path().join("bad/train.parquet"), b"text,label\nx,1\n").unwrap();
    let e = read::load(&text_cat, &r, "bad", "train")
        .expect_err("csv under a parquet name")
        .to_string();
    assert!(e.contains("not a Parquet file"), "{e}");
}

/// The spoken-digits fixture under its mirror schema: `mfcc` list<fixed_size_list<float>[13]>.
fn frames_catalogue() -> Catalogue {
    Catalogue::parse(
        r#"[[dataset]]
name = "digits"
kind = "frame_classification"
columns = { frames = "mfcc", label = "label" }
labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
local = { folder = "spoken-digits", files = { train = ["train.parquet"], test = ["test.parquet"] } }"#,
        "test",
    )
    .unwrap()
}

#[test]
fn frame_sequences_are_read_as_plain_frames() -> Result<(), DataError> {
    let split = read::load(&frames_catalogue(), &local(&mirror()), "digits", "train")?;
    let Examples::Frames { frames, labels } = &split.examples else {
        panic!("not frames")
    };
    assert_eq!(
        (frames.dim, frames.values.len(), labels.len()),
        (13, 200, 200)
    );
    // 6 to 92 frames a clip in the mirror's README.
    for i in 0..frames.values.len() {
        assert!((6..=92).contains(&frames.frames(i)), "clip {i}");
        assert_eq!(frames.values[i].len() % 13, 0);
    }
    assert!(labels.iter().all(|l| *l < 10));
    assert_eq!(split.origin(7), "train.parquet row 7");
    Ok(())
}

#[test]
fn bad_frames_name_the_row_and_the_expected_type() {
    let tmp = tempfile::tempdir().unwrap();
    let r = local(tmp.path());
    let cat = one_dataset(
        "frame_classification",
        r#"{ frames = "mfcc", label = "label" }"#,
    );
    let label = |v: &[i64]| Series::new("label".into(), v).into_column();
    let f = |v: &[f32]| Series::new("".into(), v);
    // A list of floats is one frame per value, not a sequence of frames.
    let flat = Series::new("mfcc".into(), [f(&[1.0, 2.0]), f(&[3.0])]).into_column();
    write(
        tmp.path(),
        "bad",
        "train.parquet",
        vec![flat, label(&[0, 1])],
    );
    let e = read::load(&cat, &r, "bad", "train")
        .expect_err("flat list")
        .to_string();
    assert!(
        e.contains("column `mfcc`") && e.contains("list<fixed_size_list<float>>"),
        "{e}"
    );
    // Frames of two widths in one clip.
    let clip =
        |frames: &[&[f32]]| Series::new("".into(), frames.iter().map(|v| f(v)).collect::<Vec<_>>());
    let ragged = Series::new(
        "mfcc".into(),
        [
            clip(&[&[1.0, 2.0], &[3.0, 4.0]]),
            clip(&[&[1.0, 2.0], &[3.0]]),
        ],
    )
    .into_column();
    write(
        tmp.path(),
        "bad",
        "train.parquet",
        vec![ragged, label(&[0, 1])],
    );
    let e = read::load(&cat, &r, "bad", "train")
        .expect_err("ragged")
        .to_string();
    assert!(
        e.contains("row 1") && e.contains("frame 1 has 1 values"),
        "{e}"
    );
    // Rows of different widths.
    let widths = Series::new(
        "mfcc".into(),
        [clip(&[&[1.0, 2.0]]), clip(&[&[1.0, 2.0, 3.0]])],
    )
    .into_column();
    write(
        tmp.path(),
        "bad",
        "train.parquet",
        vec![widths, label(&[0, 1])],
    );
    let e = read::load(&cat, &r, "bad", "train")
        .expect_err("widths")
        .to_string();
    assert!(e.contains("row 1") && e.contains("row 0 has 2"), "{e}");
    let nan = Series::new("mfcc".into(), [clip(&[&[1.0, f32::NAN]])]).into_column();
    write(tmp.path(), "bad", "train.parquet", vec![nan, label(&[0])]);
    let e = read::load(&cat, &r, "bad", "train")
        .expect_err("NaN")
        .to_string();
    assert!(e.contains("row 0") && e.contains("NaN"), "{e}");
}

//! Parquet through polars into plain Rust columns, with every check a user can trip over:
//! missing file, missing column, wrong dtype, nulls, labels out of range, mismatched tags, empty
//! split, frames of another width. Errors name the dataset, split, file and row.

use std::path::{Path, PathBuf};

use polars::prelude::{Column, DataFrame, DataType, ParquetReader, SerReader, Series};

use crate::catalogue::{Catalogue, DatasetEntry, Kind};
use crate::error::DataError;
use crate::examples::{Examples, Frames, Split};
use crate::resolve::{self, Resolver};

/// Resolve and read `dataset`/`split`.
pub fn load(
    catalogue: &Catalogue,
    resolver: &Resolver,
    dataset: &str,
    split: &str,
) -> Result<Split, DataError> {
    let entry = catalogue.get(dataset)?;
    let resolved = resolver.resolve(entry, split)?;
    let label_names = label_names(entry, resolver)?;
    let (examples, rows) = read_files(entry, split, &resolved.files, label_names.len())?;
    Ok(Split {
        dataset: dataset.to_string(),
        split: split.to_string(),
        source: resolved.source,
        files: resolved.files,
        label_names,
        rows,
        examples,
    })
}

/// The label names of a dataset: inline, or from its `labels_file` in the local folder.
pub fn label_names(entry: &DatasetEntry, resolver: &Resolver) -> Result<Vec<String>, DataError> {
    let Some(file) = &entry.labels_file else {
        return Ok(entry.labels.clone());
    };
    let folder = resolve::local_folder(resolver, entry).unwrap_or_default();
    let path = folder.join(file);
    let fail = |message: String| DataError::Labels {
        dataset: entry.name.clone(),
        path: path.clone(),
        message,
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| fail(format!("{e} (set --data-dir or DATAMUX_DATA_DIR)")))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| fail(e.to_string()))?;
    // Either a list of names, or {"<tags column>": [...]} as in the wnut16 mirror.
    let list = match &json {
        serde_json::Value::Array(_) => &json,
        serde_json::Value::Object(map) => {
            let key = entry
                .columns
                .tags
                .as_deref()
                .or(entry.columns.label.as_deref())
                .unwrap_or("");
            match map.get(key).or_else(|| {
                if map.len() == 1 {
                    map.values().next()
                } else {
                    None
                }
            }) {
                Some(v) => v,
                None => {
                    return Err(fail(format!(
                        "expected a list of names or an object with key `{key}`"
                    )));
                }
            }
        }
        _ => return Err(fail("expected a list of label names".into())),
    };
    let names: Option<Vec<String>> = list
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
        })
        .unwrap_or(None);
    match names {
        Some(n) if !n.is_empty() => Ok(n),
        _ => Err(fail("expected a non-empty list of strings".into())),
    }
}

/// Context for errors about one file.
struct Ctx<'a> {
    dataset: &'a str,
    split: &'a str,
    path: &'a Path,
}

impl Ctx<'_> {
    fn missing(&self, column: &str, df: &DataFrame) -> DataError {
        DataError::MissingColumn {
            dataset: self.dataset.into(),
            split: self.split.into(),
            path: self.path.into(),
            column: column.into(),
            found: df
                .get_column_names()
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }

    fn dtype(&self, column: &str, expected: &str, found: &DataType) -> DataError {
        DataError::WrongDtype {
            dataset: self.dataset.into(),
            split: self.split.into(),
            path: self.path.into(),
            column: column.into(),
            expected: expected.into(),
            found: found.to_string(),
        }
    }

    fn null(&self, column: &str, row: usize) -> DataError {
        DataError::Null {
            dataset: self.dataset.into(),
            split: self.split.into(),
            path: self.path.into(),
            column: column.into(),
            row,
        }
    }

    fn parquet(&self, message: String) -> DataError {
        DataError::Parquet {
            dataset: self.dataset.into(),
            split: self.split.into(),
            path: self.path.into(),
            message,
        }
    }

    fn frames(&self, row: usize, message: String) -> DataError {
        DataError::BadFrames {
            dataset: self.dataset.into(),
            split: self.split.into(),
            path: self.path.into(),
            row,
            message,
        }
    }

    /// A `list<fixed_size_list<float>>` (or `list<list<float>>`) column: one clip of frames a
    /// row, every frame of every row the same width, at least one frame a clip, no nulls or NaNs.
    fn frames_column(&self, df: &DataFrame, name: &str) -> Result<Frames, DataError> {
        const EXPECTED: &str = "list<fixed_size_list<float>>";
        let col = self.column(df, name)?;
        let list = col
            .list()
            .map_err(|_| self.dtype(name, EXPECTED, col.dtype()))?;
        let mut dim: Option<usize> = None;
        let mut values = Vec::with_capacity(list.len());
        for row in 0..list.len() {
            let clip = list
                .get_as_series(row)
                .ok_or_else(|| self.null(name, row))?;
            if clip.null_count() > 0 {
                return Err(self.null(name, row));
            }
            // Frames flattened frame-major, and the width of each.
            let (flat, width) = match clip.dtype() {
                DataType::Array(_, width) => {
                    let a = clip.array().map_err(|e| self.parquet(e.to_string()))?;
                    (a.get_inner(), *width)
                }
                DataType::List(_) => {
                    let frames = clip.list().map_err(|e| self.parquet(e.to_string()))?;
                    let lens: Vec<usize> = (0..frames.len())
                        .map(|f| frames.get_as_series(f).map_or(0, |s| s.len()))
                        .collect();
                    let width = lens.first().copied().unwrap_or(0);
                    if let Some(f) = lens.iter().position(|l| *l != width) {
                        return Err(self.frames(
                            row,
                            format!("frame {f} has {} values, frame 0 has {width}", lens[f]),
                        ));
                    }
                    (frames.get_inner(), width)
                }
                other => return Err(self.dtype(name, EXPECTED, other)),
            };
            if !flat.dtype().is_float() {
                return Err(self.dtype(name, EXPECTED, col.dtype()));
            }
            if width == 0 || flat.is_empty() {
                return Err(
                    self.frames(row, "the clip has no frames (or frames of width 0)".into())
                );
            }
            match dim {
                Some(d) if d != width => {
                    return Err(
                        self.frames(row, format!("frames of {width} values, but row 0 has {d}"))
                    );
                }
                _ => dim = Some(width),
            }
            let cast = flat
                .cast(&DataType::Float32)
                .map_err(|e| self.parquet(e.to_string()))?;
            let ca = cast.f32().map_err(|e| self.parquet(e.to_string()))?;
            let clip: Vec<f32> = ca
                .iter()
                .map(|v| v.ok_or_else(|| self.null(name, row)))
                .collect::<Result<_, _>>()?;
            if clip.iter().any(|v| !v.is_finite()) {
                return Err(self.frames(row, "a frame holds a NaN or an infinity".into()));
            }
            values.push(clip);
        }
        Ok(Frames {
            dim: dim.unwrap_or(0),
            values,
        })
    }

    fn column<'d>(&self, df: &'d DataFrame, name: &str) -> Result<&'d Column, DataError> {
        df.column(name).map_err(|_| self.missing(name, df))
    }

    fn strings(&self, df: &DataFrame, name: &str) -> Result<Vec<String>, DataError> {
        let col = self.column(df, name)?;
        let ca = col
            .str()
            .map_err(|_| self.dtype(name, "string", col.dtype()))?;
        ca.iter()
            .enumerate()
            .map(|(row, v)| v.map(str::to_string).ok_or_else(|| self.null(name, row)))
            .collect()
    }

    /// The label column `name`: one id in `0..count` a row.
    fn labels(&self, df: &DataFrame, name: &str, count: usize) -> Result<Vec<u32>, DataError> {
        let series = self.column(df, name)?.as_materialized_series();
        self.ids(series, name, None, count, "label")
    }

    /// Integer ids in `0..count`.
    fn ids(
        &self,
        series: &Series,
        name: &str,
        row: Option<usize>,
        count: usize,
        what: &'static str,
    ) -> Result<Vec<u32>, DataError> {
        if !series.dtype().is_integer() {
            return Err(self.dtype(name, "integer", series.dtype()));
        }
        let cast = series
            .cast(&DataType::Int64)
            .map_err(|e| self.parquet(e.to_string()))?;
        let ca = cast.i64().map_err(|e| self.parquet(e.to_string()))?;
        ca.iter()
            .enumerate()
            .map(|(i, v)| {
                let r = row.unwrap_or(i);
                let v = v.ok_or_else(|| self.null(name, r))?;
                if v < 0 || v as usize >= count {
                    return Err(DataError::LabelOutOfRange {
                        dataset: self.dataset.into(),
                        split: self.split.into(),
                        path: self.path.into(),
                        row: r,
                        what,
                        value: v,
                        count,
                    });
                }
                Ok(v as u32)
            })
            .collect()
    }
}

fn role(name: &Option<String>) -> &str {
    name.as_deref().unwrap_or_default()
}

/// Read and check the files of one split; `num_labels` bounds label and tag ids. Also returns
/// the `(file, row)` each example was read from.
pub fn read_files(
    entry: &DatasetEntry,
    split: &str,
    files: &[PathBuf],
    num_labels: usize,
) -> Result<(Examples, Vec<(usize, usize)>), DataError> {
    let mut out: Option<Examples> = None;
    let mut rows = Vec::new();
    for (file, path) in files.iter().enumerate() {
        let ctx = Ctx {
            dataset: &entry.name,
            split,
            path,
        };
        let (part, part_rows) = read_one(entry, &ctx, num_labels)?;
        rows.extend(part_rows.into_iter().map(|r| (file, r)));
        out = Some(match (out, part) {
            (None, p) => p,
            (Some(Examples::Corpus { mut texts }), Examples::Corpus { texts: more }) => {
                texts.extend(more);
                Examples::Corpus { texts }
            }
            (
                Some(Examples::Images {
                    mut images,
                    mut labels,
                }),
                Examples::Images {
                    images: i,
                    labels: l,
                },
            ) => {
                images.extend(i);
                labels.extend(l);
                Examples::Images { images, labels }
            }
            (
                Some(Examples::Text {
                    mut texts,
                    pairs,
                    mut labels,
                }),
                Examples::Text {
                    texts: t,
                    pairs: p,
                    labels: l,
                },
            ) => {
                texts.extend(t);
                labels.extend(l);
                let pairs = match (pairs, p) {
                    (Some(mut a), Some(b)) => {
                        a.extend(b);
                        Some(a)
                    }
                    _ => None,
                };
                Examples::Text {
                    texts,
                    pairs,
                    labels,
                }
            }
            (
                Some(Examples::Tokens {
                    mut tokens,
                    mut tags,
                }),
                Examples::Tokens { tokens: t, tags: g },
            ) => {
                tokens.extend(t);
                tags.extend(g);
                Examples::Tokens { tokens, tags }
            }
            (
                Some(Examples::Frames {
                    mut frames,
                    mut labels,
                }),
                Examples::Frames {
                    frames: f,
                    labels: l,
                },
            ) => {
                if f.dim != frames.dim {
                    return Err(ctx.frames(
                        0,
                        format!(
                            "frames of {} values, but the split's first file has {}",
                            f.dim, frames.dim
                        ),
                    ));
                }
                frames.values.extend(f.values);
                labels.extend(l);
                Examples::Frames { frames, labels }
            }
            (Some(_), _) => return Err(ctx.parquet("files of one split disagree in kind".into())),
        });
    }
    match out {
        Some(ex) if !ex.is_empty() => Ok((ex, rows)),
        _ => Err(DataError::EmptySplit {
            dataset: entry.name.clone(),
            split: split.to_string(),
            path: files.first().cloned().unwrap_or_default(),
        }),
    }
}

/// One file's examples and the file row of each.
fn read_one(
    entry: &DatasetEntry,
    ctx: &Ctx<'_>,
    num_labels: usize,
) -> Result<(Examples, Vec<usize>), DataError> {
    if !ctx.path.is_file() {
        return Err(ctx.parquet("no such file".into()));
    }
    if !resolve::is_parquet(ctx.path) {
        return Err(ctx.parquet("not a Parquet file (no PAR1 magic)".into()));
    }
    let file = std::fs::File::open(ctx.path).map_err(|e| ctx.parquet(e.to_string()))?;
    let df = ParquetReader::new(file)
        .finish()
        .map_err(|e| ctx.parquet(e.to_string()))?;
    let c = &entry.columns;
    let all = |n: usize| (0..n).collect::<Vec<_>>();
    match entry.kind {
        Kind::ImageClassification => {
            let name = role(&c.image);
            let col = ctx.column(&df, name)?.as_materialized_series();
            let bytes = match col.dtype() {
                DataType::Struct(_) => col
                    .struct_()
                    .and_then(|s| s.field_by_name("bytes"))
                    .map_err(|_| ctx.dtype(name, "struct{bytes: binary}", col.dtype()))?,
                DataType::Binary => col.clone(),
                other => return Err(ctx.dtype(name, "struct{bytes: binary} or binary", other)),
            };
            let bin = bytes
                .binary()
                .map_err(|_| ctx.dtype(name, "struct{bytes: binary}", col.dtype()))?;
            let images = bin
                .iter()
                .enumerate()
                .map(|(row, v)| v.map(<[u8]>::to_vec).ok_or_else(|| ctx.null(name, row)))
                .collect::<Result<Vec<_>, _>>()?;
            let labels = ctx.labels(&df, role(&c.label), num_labels)?;
            let rows = all(labels.len());
            Ok((Examples::Images { images, labels }, rows))
        }
        Kind::TextClassification => {
            let texts = ctx.strings(&df, role(&c.text))?;
            let pairs = c
                .text_pair
                .as_deref()
                .map(|p| ctx.strings(&df, p))
                .transpose()?;
            let labels = ctx.labels(&df, role(&c.label), num_labels)?;
            let rows = all(labels.len());
            Ok((
                Examples::Text {
                    texts,
                    pairs,
                    labels,
                },
                rows,
            ))
        }
        Kind::TokenClassification => {
            let (tname, gname) = (role(&c.tokens), role(&c.tags));
            let tcol = ctx.column(&df, tname)?;
            let tlist = tcol
                .list()
                .map_err(|_| ctx.dtype(tname, "list<string>", tcol.dtype()))?;
            let gcol = ctx.column(&df, gname)?;
            let glist = gcol
                .list()
                .map_err(|_| ctx.dtype(gname, "list<integer>", gcol.dtype()))?;
            let mut tokens = Vec::with_capacity(tlist.len());
            let mut tags = Vec::with_capacity(glist.len());
            for row in 0..tlist.len().min(glist.len()) {
                let t = tlist
                    .get_as_series(row)
                    .ok_or_else(|| ctx.null(tname, row))?;
                let g = glist
                    .get_as_series(row)
                    .ok_or_else(|| ctx.null(gname, row))?;
                let words = t
                    .str()
                    .map_err(|_| ctx.dtype(tname, "list<string>", tcol.dtype()))?;
                let words = words
                    .iter()
                    .map(|w| w.map(str::to_string).ok_or_else(|| ctx.null(tname, row)))
                    .collect::<Result<Vec<_>, _>>()?;
                let ids = ctx.ids(&g, gname, Some(row), num_labels, "tag")?;
                if words.len() != ids.len() {
                    return Err(DataError::TagCount {
                        dataset: ctx.dataset.into(),
                        split: ctx.split.into(),
                        path: ctx.path.into(),
                        row,
                        tokens: words.len(),
                        tags: ids.len(),
                    });
                }
                tokens.push(words);
                tags.push(ids);
            }
            let rows = all(tags.len());
            Ok((Examples::Tokens { tokens, tags }, rows))
        }
        Kind::TextCorpus => {
            // WikiText separates articles with empty lines; they carry no tokens.
            let (rows, texts) = ctx
                .strings(&df, role(&c.text))?
                .into_iter()
                .enumerate()
                .filter(|(_, t)| !t.trim().is_empty())
                .unzip();
            Ok((Examples::Corpus { texts }, rows))
        }
        Kind::FrameClassification => {
            let frames = ctx.frames_column(&df, role(&c.frames))?;
            let labels = ctx.labels(&df, role(&c.label), num_labels)?;
            let rows = all(labels.len());
            Ok((Examples::Frames { frames, labels }, rows))
        }
    }
}

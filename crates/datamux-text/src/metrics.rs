//! Entity-level micro F1 over BIO tags, as seqeval computes it in its default mode: an entity
//! starts at `B-X`, or at `I-X` after `O` or after another type, and ends before `O`, `B-*` or a
//! change of type.

/// `(type, start, end)` spans, `end` exclusive.
pub fn entities(tags: &[&str]) -> Vec<(String, usize, usize)> {
    let mut out = Vec::new();
    let mut open: Option<(String, usize)> = None;
    for (i, tag) in tags.iter().enumerate() {
        let (prefix, kind) = match tag.split_once('-') {
            Some((p, k)) => (p, k),
            None => ("O", ""),
        };
        let continues = prefix == "I" && open.as_ref().is_some_and(|(k, _)| k == kind);
        if !continues {
            if let Some((k, s)) = open.take() {
                out.push((k, s, i));
            }
            if prefix == "B" || prefix == "I" {
                open = Some((kind.to_string(), i));
            }
        }
    }
    if let Some((k, s)) = open {
        out.push((k, s, tags.len()));
    }
    out
}

/// `[true positives, false positives, false negatives]` of one sequence.
pub fn span_counts(gold: &[&str], pred: &[&str]) -> [u64; 3] {
    let g = entities(gold);
    let p = entities(pred);
    let tp = p.iter().filter(|e| g.contains(e)).count() as u64;
    [tp, p.len() as u64 - tp, g.len() as u64 - tp]
}

#[cfg(test)]
mod tests {
    use super::*;
    use datamux_core::Score;

    #[test]
    fn spans_follow_seqeval() {
        let tags = [
            "B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC", "B-ORG", "I-PER",
        ];
        assert_eq!(
            entities(&tags),
            vec![
                ("PER".to_string(), 0, 2),
                ("LOC".to_string(), 3, 5),
                ("LOC".to_string(), 5, 6),
                ("ORG".to_string(), 6, 7),
                ("PER".to_string(), 7, 8),
            ]
        );
    }

    #[test]
    fn f1_on_hand_made_spans() {
        // The example of seqeval's README, whose `f1_score` prints 0.50.
        let gold1 = ["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"];
        let pred1 = ["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"];
        let gold2 = ["B-PER", "I-PER", "O"];
        let mut s = Score::default();
        for (g, p) in [(&gold1[..], &pred1[..]), (&gold2[..], &gold2[..])] {
            s.merge(&Score {
                spans: Some(span_counts(g, p)),
                ..Score::default()
            });
        }
        assert_eq!(s.spans, Some([1, 1, 1]));
        let f1 = s.metric("f1").expect("f1");
        assert!((f1 - 0.5).abs() < 1e-12, "{f1}");
    }
}

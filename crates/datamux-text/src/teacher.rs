//! The text modality's N = 1 teacher (`train.distill`, sentence classification).

use anyhow::{Result, ensure};
use datamux_core::SeededVarMap;
use datamux_data::Splits;
use datamux_pipeline::{Context, Modality, RunConfig, Stage};

use crate::pipeline::{Text, pretrained, text_task, tokenizer};
use crate::task::{HeadKind, TextTask};
use crate::tokenizer::TextTokenizer;

impl Text {
    /// The finished N = 1 run `t` as a teacher: trained first (as that run, its warm-up
    /// included, under its lock) when its checkpoint is not finished, then loaded. Its
    /// tokenizer must be the student's, since the teacher reads the student's token ids.
    pub(crate) fn teacher(
        &self,
        t: &RunConfig,
        s: &Splits,
        tk: &TextTokenizer,
        ctx: &mut Context<'_>,
    ) -> Result<(TextTask, SeededVarMap)> {
        use datamux_pipeline::checkpoint;
        let (dir, finished) = datamux_pipeline::teacher::finished(t, ctx)?;
        if !finished {
            self.train(t, s, ctx)?;
        }
        let pre = pretrained(t, ctx.env)?;
        let own = tokenizer(t, &ctx.env.cache_dir, &s.train, pre.as_ref())?;
        ensure!(
            own.to_json()? == tk.to_json()?,
            "train.distill: the teacher {} tokenizes otherwise than this run; the two must agree",
            t.run_id()
        );
        let map = SeededVarMap::new(t.seed);
        let weights = (t.train.task_weight, t.train.retrieval_weight);
        let labels = &s.train.label_names;
        let task = text_task(
            t,
            HeadKind::Sentence,
            labels,
            tk,
            weights,
            &map,
            pre.as_ref(),
        )?;
        let saved = checkpoint::load(&dir, &map)?;
        task.net.check_buffers(&saved)?;
        ctx.tick(Stage::Train, 0, 1, "loaded the teacher");
        Ok((task, map))
    }
}

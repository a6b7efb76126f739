//! The order in which workers take jobs: the queue's order, except that a worker does not start
//! a job whose warm-up another worker may still be training (it would wait on that warm-up's
//! lock with a core idle).

use std::collections::VecDeque;

use crate::job::Job;

/// The jobs left to start, in order, and the retrieval warm-ups each worker's job may still be
/// training.
pub struct Queue {
    /// (experiment index, job, the job's warm-ups: `Job::warmups`).
    left: VecDeque<(usize, Job, Vec<String>)>,
    /// Per worker slot: the run id of its job and the warm-ups it may still be training.
    warming: Vec<(String, Vec<String>)>,
}

impl Queue {
    pub fn new(list: Vec<(usize, Job)>, slots: usize) -> Self {
        // A run that teaches another of the list (`train.distill`) is named by its own id until
        // it finishes: its students load its checkpoint first.
        let teachers: Vec<String> = list.iter().flat_map(|(_, j)| j.warmups()).collect();
        Self {
            left: list
                .into_iter()
                .map(|(exp, job)| {
                    let mut w = job.warmups();
                    let id = job.run().run_id();
                    if matches!(job, Job::Train(_)) && teachers.contains(&id) {
                        w.push(id);
                    }
                    (exp, job, w)
                })
                .collect(),
            warming: vec![(String::new(), Vec::new()); slots],
        }
    }

    /// The next job for `slot`: the first that needs no warm-up another worker may be training
    /// (it would wait on that warm-up's lock with a core idle: the N = 10 warm-up of the
    /// curriculum starts from the N = 5 one); the first of all when every job left does.
    pub fn next(&mut self, slot: usize) -> Option<(usize, Job)> {
        let warming = &self.warming;
        let busy = |w: &String| warming.iter().any(|(_, ws)| ws.contains(w));
        let i = self
            .left
            .iter()
            .position(|(_, _, ws)| !ws.iter().any(busy))
            .unwrap_or(0);
        let (exp, job, ws) = self.left.remove(i)?;
        self.warming[slot] = (job.run().run_id(), ws);
        Some((exp, job))
    }

    /// The job `run_id` of `slot` is past its warm-ups, or `finished`. A teacher's own name
    /// (`new`) is kept until it finishes.
    /// A message of the slot's previous job, read after the slot took its next one, names that
    /// job and changes nothing.
    pub fn warmed_up(&mut self, slot: usize, run_id: &str, finished: bool) {
        if self.warming[slot].0 == run_id {
            self.warming[slot].1.retain(|w| !finished && w == run_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config;

    #[test]
    fn a_worker_does_not_start_a_job_whose_warm_up_another_is_training() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/text-sentence.toml");
        let catalogue = datamux_data::Catalogue::builtin().unwrap();
        let runs = config::load(&path, "smoke", &[], &catalogue).unwrap().runs;
        let find = |n: usize, warm: bool| {
            let r = runs
                .iter()
                .find(|r| {
                    r.data.dataset == "rt-snippets"
                        && r.model.n_instances == n
                        && r.warmup.enabled == warm
                })
                .unwrap();
            Job::Train(r.clone())
        };
        // The smoke profile's N = 2 warm-up starts from the N = 1 one.
        let (n2, n1, b1) = (find(2, true), find(1, true), find(1, false));
        assert_eq!(n2.warmups().len(), 2);
        assert_eq!(n2.warmups()[1], n1.warmups()[0]);
        assert!(b1.warmups().is_empty());
        assert!(Job::Speed(n2.run().clone()).warmups().is_empty());
        let id = |j: &(usize, Job)| j.1.run().run_id();

        let mut q = Queue::new(vec![(0, n2.clone()), (1, n1.clone()), (2, b1.clone())], 2);
        assert_eq!(id(&q.next(0).unwrap()), n2.run().run_id());
        // N = 1's warm-up is being trained by slot 0 (as the source of N = 2's): B1 goes first.
        assert_eq!(id(&q.next(1).unwrap()), b1.run().run_id());
        q.warmed_up(1, &b1.run().run_id(), false);
        // When every job left waits on a warm-up, the first goes anyway.
        assert_eq!(id(&q.next(1).unwrap()), n1.run().run_id());
        assert!(q.next(0).is_none());

        // Once slot 0 fine-tunes, its warm-ups are finished and block nothing.
        let mut q = Queue::new(vec![(0, n2.clone()), (1, n1.clone()), (2, b1.clone())], 2);
        q.next(0);
        // A late message of another job of slot 0 changes nothing.
        q.warmed_up(0, &b1.run().run_id(), false);
        assert_eq!(id(&q.next(1).unwrap()), b1.run().run_id());
        q.warmed_up(0, &n2.run().run_id(), false);
        assert_eq!(id(&q.next(1).unwrap()), n1.run().run_id());
    }

    /// An N = 1 run keeps its name while it trains (it is the teacher the students load first):
    /// a student is not started beside it while another job can be.
    #[test]
    fn a_student_waits_for_its_teacher_to_finish_not_to_start() {
        let dir = tempfile::tempdir().unwrap();
        let text = "name = \"t\"\nmodality = \"vision\"\n[data]\ndataset = \"mnist\"\n\
                    [model]\nbackbone = \"mlp\"\ndemux = { kind = \"mlp\" }\n[train]\nsteps = 10\n\
                    distill = { weight = 0.5 }\n[sweep]\nn_instances = [1, 2]\nseeds = [0, 1]\n";
        let path = dir.path().join("t.toml");
        std::fs::write(&path, text).unwrap();
        let catalogue = datamux_data::Catalogue::builtin().unwrap();
        let runs = config::load(&path, "default", &[], &catalogue)
            .unwrap()
            .runs;
        let job = |n: usize, seed: u64| {
            let r = runs
                .iter()
                .find(|r| r.model.n_instances == n && r.seed == seed);
            Job::Train(r.unwrap().clone())
        };
        let (t0, s0, t1) = (job(1, 0), job(2, 0), job(1, 1));
        assert_eq!(s0.warmups(), [t0.run().run_id()]);
        assert!(t0.warmups().is_empty());
        let id = |j: &(usize, Job)| j.1.run().run_id();
        let mut q = Queue::new(vec![(0, t0.clone()), (0, s0.clone()), (0, t1.clone())], 2);
        assert_eq!(id(&q.next(0).unwrap()), t0.run().run_id());
        // The teacher trains its task (a Train tick): still its own name, so the student waits.
        q.warmed_up(0, &t0.run().run_id(), false);
        assert_eq!(id(&q.next(1).unwrap()), t1.run().run_id());
        q.warmed_up(0, &t0.run().run_id(), true);
        assert_eq!(id(&q.next(0).unwrap()), s0.run().run_id());
    }
}

//! ListContainers' filter: by id, pod, state and labels (all must match).

use std::collections::BTreeMap;

use super::{Container, ContainerState};

/// ListContainers' filter in the layer's terms.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub id: String,
    pub pod_id: String,
    pub state: Option<ContainerState>,
    pub labels: BTreeMap<String, String>,
}

impl Filter {
    pub fn matches(&self, c: &Container) -> bool {
        (self.id.is_empty() || c.id == self.id)
            && (self.pod_id.is_empty() || c.pod_id == self.pod_id)
            && self.state.is_none_or(|s| s == c.state)
            && self
                .labels
                .iter()
                .all(|(k, v)| c.config.labels.get(k) == Some(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container_spec::ContainerConfig;
    use crate::containers::ContainerState;
    use std::path::PathBuf;

    fn container(id: &str, pod: &str, state: ContainerState, labels: &[(&str, &str)]) -> Container {
        Container {
            id: id.into(),
            pod_id: pod.into(),
            config: ContainerConfig {
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            },
            image_name: String::new(),
            image_id: String::new(),
            image_ref: String::new(),
            state,
            created_at_ns: 0,
            started_at_ns: 0,
            finished_at_ns: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            log_path: None,
            process: serde_json::Value::Null,
            bundle: PathBuf::new(),
            rw_dir: PathBuf::new(),
            shim_address: String::new(),
            task_deleted: false,
            oom_killed: false,
        }
    }

    #[test]
    fn filters_by_id_pod_state_and_labels() {
        let cs = [
            container(
                "a",
                "p1",
                ContainerState::Running,
                &[("app", "x"), ("tier", "1")],
            ),
            container("b", "p1", ContainerState::Exited, &[("app", "x")]),
            container("c", "p2", ContainerState::Created, &[]),
        ];
        let ids = |f: Filter| -> Vec<&str> {
            cs.iter()
                .filter(|c| f.matches(c))
                .map(|c| c.id.as_str())
                .collect()
        };
        assert_eq!(ids(Filter::default()), ["a", "b", "c"]);
        let by_id = Filter {
            id: "b".into(),
            ..Default::default()
        };
        assert_eq!(ids(by_id), ["b"]);
        let by_pod = Filter {
            pod_id: "p1".into(),
            ..Default::default()
        };
        assert_eq!(ids(by_pod), ["a", "b"]);
        let by_state = Filter {
            state: Some(ContainerState::Created),
            ..Default::default()
        };
        assert_eq!(ids(by_state), ["c"]);
        let mut labels = Filter::default();
        labels.labels.insert("app".into(), "x".into());
        assert_eq!(ids(labels.clone()), ["a", "b"]);
        labels.labels.insert("tier".into(), "1".into());
        assert_eq!(ids(labels.clone()), ["a"]);
        labels.labels.insert("tier".into(), "2".into());
        assert!(ids(labels).is_empty());
        let none = Filter {
            id: "a".into(),
            pod_id: "p2".into(),
            ..Default::default()
        };
        assert!(ids(none).is_empty());
    }
}

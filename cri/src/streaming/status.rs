//! The exit status of an exec/attach, as the `metav1.Status` JSON that protocol v4 and
//! later put on the error stream (kubelet: `remotecommand.v4WriteStatusFunc`), and the
//! plain-text error of the older versions.

use serde_json::json;

/// `{"metadata":{},"status":"Success"}` for exit code 0, else a Failure with reason
/// `NonZeroExitCode` and the code as the `ExitCode` cause (what kubectl and crictl parse
/// into the exit code they return).
pub fn exit_status_json(code: i32) -> String {
    if code == 0 {
        return json!({"metadata": {}, "status": "Success"}).to_string();
    }
    json!({
        "metadata": {},
        "status": "Failure",
        "message": format!("command terminated with non-zero exit code: exit status {code}"),
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
    })
    .to_string()
}

/// A failure that is not an exit code (the command could not run).
pub fn error_status_json(message: &str) -> String {
    json!({
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": "InternalError",
        "code": 500,
    })
    .to_string()
}

/// Protocols before v4 carry errors as plain text and success as nothing.
pub fn exit_status_text(code: i32) -> Option<String> {
    (code != 0).then(|| format!("command terminated with non-zero exit code: exit status {code}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_and_failure_shapes() {
        let ok: serde_json::Value = serde_json::from_str(&exit_status_json(0)).unwrap();
        assert_eq!(ok["status"], "Success");
        let f: serde_json::Value = serde_json::from_str(&exit_status_json(3)).unwrap();
        assert_eq!(f["status"], "Failure");
        assert_eq!(f["reason"], "NonZeroExitCode");
        assert_eq!(f["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(f["details"]["causes"][0]["message"], "3");
        assert_eq!(exit_status_text(0), None);
        assert!(exit_status_text(2).unwrap().contains('2'));
    }
}

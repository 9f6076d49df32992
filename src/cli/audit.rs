//! `imgfleet audit`: the hub's audit trail as a table, or as JSON lines in
//! the shape of the Kubernetes `audit.k8s.io/v1` Event where its fields apply,
//! so existing log pipelines can take them. Pure rendering; the query is in
//! `mod.rs`.

use imgfleet::api::v1 as pb;
use k8s_openapi::jiff::Timestamp;
use serde_json::json;

use super::format::table;

fn time_of(e: &pb::AuditEvent) -> String {
    e.time
        .as_ref()
        .and_then(|t| Timestamp::new(t.seconds, t.nanos).ok())
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
        .unwrap_or_default()
}

/// The HTTP status Kubernetes would answer for a gRPC code, as its audit
/// events carry it in `responseStatus.code`.
fn http_code(grpc: i32) -> u16 {
    match tonic::Code::from_i32(grpc) {
        tonic::Code::Ok => 200,
        tonic::Code::InvalidArgument | tonic::Code::OutOfRange => 400,
        tonic::Code::Unauthenticated => 401,
        tonic::Code::PermissionDenied => 403,
        tonic::Code::NotFound => 404,
        tonic::Code::AlreadyExists | tonic::Code::Aborted => 409,
        tonic::Code::FailedPrecondition => 412,
        tonic::Code::ResourceExhausted => 429,
        tonic::Code::Unavailable => 503,
        tonic::Code::DeadlineExceeded => 504,
        _ => 500,
    }
}

/// One event as a Kubernetes audit Event (JSON, one line).
pub fn to_k8s_event(e: &pb::AuditEvent) -> String {
    let source_ip = e
        .source
        .parse::<std::net::SocketAddr>()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| e.source.clone());
    let mut object_ref = json!({
        "resource": e.resource,
        "apiGroup": imgfleet::model::GROUP,
        "apiVersion": imgfleet::model::VERSION,
    });
    for (field, value) in [
        ("namespace", &e.namespace),
        ("name", &e.name),
        ("resourceVersion", &e.resource_version),
    ] {
        if !value.is_empty() {
            object_ref[field] = json!(value);
        }
    }
    let ok = e.code == 0;
    let time = time_of(e);
    let event = json!({
        "kind": "Event",
        "apiVersion": "audit.k8s.io/v1",
        "level": "Metadata",
        "auditID": e.audit_id,
        "stage": "ResponseComplete",
        "verb": e.verb,
        "user": {"username": e.user, "groups": e.groups},
        "sourceIPs": if source_ip.is_empty() { vec![] } else { vec![source_ip] },
        "objectRef": object_ref,
        "responseStatus": {
            "code": http_code(e.code),
            "status": if ok { "Success" } else { "Failure" },
            "message": e.message,
        },
        "requestReceivedTimestamp": time,
        "stageTimestamp": time,
        "annotations": {
            "imgfleet.theriseunion.io/outcome": e.outcome,
            "imgfleet.theriseunion.io/grpc-code": e.code.to_string(),
        },
    });
    event.to_string()
}

/// The events as a table, oldest first.
pub fn audit_table(events: &[pb::AuditEvent]) -> String {
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                time_of(e),
                e.user.clone(),
                e.verb.clone(),
                e.resource.clone(),
                if e.namespace.is_empty() {
                    "-".to_owned()
                } else {
                    e.namespace.clone()
                },
                if e.name.is_empty() {
                    "-".to_owned()
                } else {
                    e.name.clone()
                },
                e.outcome.clone(),
                if e.resource_version.is_empty() {
                    "-".to_owned()
                } else {
                    e.resource_version.clone()
                },
                e.message.clone(),
            ]
        })
        .collect();
    table(
        &[
            "TIME",
            "USER",
            "VERB",
            "RESOURCE",
            "NAMESPACE",
            "NAME",
            "OUTCOME",
            "RV",
            "MESSAGE",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> pb::AuditEvent {
        pb::AuditEvent {
            audit_id: "id-1".into(),
            time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5_000,
            }),
            user: "user-a".into(),
            groups: vec!["dev".into()],
            verb: "apply".into(),
            resource: "repositories".into(),
            namespace: "team-b".into(),
            name: "x".into(),
            outcome: "denied".into(),
            code: tonic::Code::PermissionDenied as i32,
            resource_version: String::new(),
            source: "127.0.0.1:5555".into(),
            message: "user-a may not apply repositories in namespace team-b".into(),
        }
    }

    #[test]
    fn json_follows_the_kubernetes_audit_event() {
        let v: serde_json::Value = serde_json::from_str(&to_k8s_event(&event())).expect("json");
        assert_eq!(v["apiVersion"], "audit.k8s.io/v1");
        assert_eq!(v["auditID"], "id-1");
        assert_eq!(v["verb"], "apply");
        assert_eq!(v["user"]["username"], "user-a");
        assert_eq!(v["user"]["groups"][0], "dev");
        assert_eq!(v["objectRef"]["namespace"], "team-b");
        assert_eq!(v["objectRef"]["resource"], "repositories");
        assert!(v["objectRef"].get("resourceVersion").is_none());
        assert_eq!(v["responseStatus"]["code"], 403);
        assert_eq!(v["sourceIPs"][0], "127.0.0.1");
        assert_eq!(v["stageTimestamp"], "2023-11-14T22:13:20.000005Z");
        let t = audit_table(&[event()]);
        assert!(t.contains("user-a") && t.contains("denied"), "{t}");
    }
}

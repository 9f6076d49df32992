//! One change is one trace: with `OTEL_EXPORTER_OTLP_ENDPOINT` pointing the hub and an
//! agent at a real OTLP/gRPC receiver (PyPI's grpcio and opentelemetry-proto), an
//! `imgfleet apply` of a Repository produces, in one trace, the hub's Apply, tag resolution,
//! desired-set computation and send spans, and the agent's receive and sync spans with its
//! manifest and blob fetches. The agent's sync span is a child of the hub's resolution span
//! (the change's W3C trace context rides with the desired-set entry). `OTEL_SERVICE_NAME`
//! names the agent's service; the hub, without one, uses its own name.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use imgfleet_tests::fleet::{AgentOptions, AgentProcess, HubOptions, HubProcess};
use imgfleet_tests::images::{ImageSpec, PushTarget};
use imgfleet_tests::otlp::{OtlpReceiver, ReceivedSpan};
use imgfleet_tests::{Registry, RegistryOptions, policy, wait_until};

const CONVERGE: Duration = Duration::from_secs(90);

fn otel_env(receiver: &OtlpReceiver) -> Vec<(String, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), receiver.endpoint()),
        // Export within a fraction of a second rather than the default 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "200".into()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_and_every_clusters_sync_share_one_trace() -> Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    let registry = Registry::start(RegistryOptions::plain()).await?;
    PushTarget::from(&registry)
        .push_image(
            "library/app",
            "v1",
            &ImageSpec::random(&[64 << 10, 32 << 10], 41),
        )
        .await?;
    let hub = HubProcess::start(HubOptions {
        env: otel_env(&receiver),
        ..HubOptions::embedded(root.join("hub"))
    })
    .await?;
    let cli = hub.cli();
    let creds = cli
        .enroll(
            "edge-1",
            &[],
            &["default"],
            &root.join("edge-1-credentials"),
        )
        .await?;
    let mut env = otel_env(&receiver);
    env.push(("OTEL_SERVICE_NAME".into(), "imgfleet-agent-edge-1".into()));
    let _agent = AgentProcess::start(AgentOptions {
        env,
        ..AgentOptions::new(vec![hub.url()], creds, root.join("edge-1-agent"))
    })
    .await?;

    cli.apply_yaml(&policy::objects(&[
        policy::registry_secret("upstream", &registry.addr(), None),
        policy::repository("app", "library/app", "v1", "upstream", ""),
    ]))
    .await?;
    imgfleet_tests::fleet::wait_repository_synced(&cli, "default", "app", 1, CONVERGE).await?;

    // The agent's sync of the image, and the trace it belongs to.
    let complete = wait_until("the whole trace at the receiver", CONVERGE, || {
        let spans = receiver.spans();
        async move { Ok(whole_trace(&spans?).is_some()) }
    })
    .await;
    let all = receiver.spans()?;
    if let Err(e) = complete {
        let seen: Vec<String> = all
            .iter()
            .map(|s| format!("{}/{} in {}", s.service, s.name, &s.trace_id[..8]))
            .collect();
        return Err(e.context(format!("spans received: {seen:#?}")));
    }
    let (sync, trace) = whole_trace(&all).context("the trace")?;
    println!("trace {}:", sync.trace_id);
    for s in &trace {
        println!(
            "  {:<22} {:<20} span {} parent {}",
            s.service, s.name, s.span_id, s.parent_span_id
        );
    }

    // The Apply is the root of the trace; the sync is a child of the hub's resolution,
    // whose parent is the Apply.
    let find = |name: &str| {
        trace
            .iter()
            .find(|s| s.service == "imgfleet-hub" && s.name == name)
            .cloned()
            .with_context(|| format!("no hub span {name}"))
    };
    let apply = find("Apply")?;
    let resolve = find("resolve tags")?;
    ensure!(
        apply.parent_span_id.is_empty(),
        "Apply has a parent: {apply:?}"
    );
    ensure!(
        resolve.parent_span_id == apply.span_id,
        "resolution {resolve:?} is not a child of {apply:?}"
    );
    ensure!(
        sync.parent_span_id == resolve.span_id,
        "the agent's sync {sync:?} is not a child of the hub's resolution {resolve:?}"
    );
    // The blob fetches nest under the sync.
    let blob = trace
        .iter()
        .find(|s| s.name == "fetch blob")
        .context("a blob fetch")?;
    let image = trace
        .iter()
        .find(|s| s.span_id == blob.parent_span_id)
        .context("the blob fetch's parent")?;
    ensure!(
        image.parent_span_id == sync.span_id,
        "the fetch's parent {image:?} is not under the sync {sync:?}"
    );
    Ok(())
}

/// Every span the trace of an apply must hold, by service and name.
const WANTED: [(&str, &str); 8] = [
    ("imgfleet-hub", "Apply"),
    ("imgfleet-hub", "resolve tags"),
    ("imgfleet-hub", "compute desired sets"),
    ("imgfleet-hub", "send desired set"),
    ("imgfleet-agent-edge-1", "receive desired set"),
    ("imgfleet-agent-edge-1", "sync image"),
    ("imgfleet-agent-edge-1", "manifest"),
    ("imgfleet-agent-edge-1", "fetch blob"),
];

/// The agent's sync span and the spans of its trace, once that trace holds [`WANTED`].
fn whole_trace(spans: &[ReceivedSpan]) -> Option<(ReceivedSpan, Vec<ReceivedSpan>)> {
    let sync = spans
        .iter()
        .find(|s| s.service == "imgfleet-agent-edge-1" && s.name == "sync image")?;
    let trace: Vec<ReceivedSpan> = spans
        .iter()
        .filter(|t| t.trace_id == sync.trace_id)
        .cloned()
        .collect();
    let names: BTreeSet<(&str, &str)> = trace
        .iter()
        .map(|t| (t.service.as_str(), t.name.as_str()))
        .collect();
    WANTED
        .iter()
        .all(|want| names.contains(want))
        .then(|| (sync.clone(), trace))
}

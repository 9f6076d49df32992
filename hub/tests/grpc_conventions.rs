//! The hub's gRPC port speaks the conventions generic tooling expects, behind the same mTLS
//! as its own APIs: `grpc.health.v1.Health` (SERVING while the policy store answers, for the
//! server and for each of its services) and server reflection (`grpc.reflection.v1`, and
//! `v1alpha`), which lists the services and returns the wire contract's descriptors. A caller
//! without a client certificate of the hub's CA gets neither.

use std::time::Duration;

use imgfleet_common::tls::TlsMaterial;
use imgfleet_hub::config::Config;
use imgfleet_hub::server::{self, Parts};
use prost::Message as _;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

async fn reflect(
    channel: Channel,
    request: MessageRequest,
) -> Result<MessageResponse, tonic::Status> {
    let mut client = ServerReflectionClient::new(channel);
    let outbound = tokio_stream::iter(vec![ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    }]);
    let mut answers = client.server_reflection_info(outbound).await?.into_inner();
    let answer = answers
        .message()
        .await?
        .ok_or_else(|| tonic::Status::unknown("no answer"))?;
    answer
        .message_response
        .ok_or_else(|| tonic::Status::unknown("empty answer"))
}

#[tokio::test]
async fn health_and_reflection_answer_authenticated_callers_only() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = Config::for_data_dir(dir.path());
    let hub = server::start_with(cfg, CancellationToken::new(), Parts::ALL)
        .await
        .expect("hub starts");
    let admin = TlsMaterial::from_dir(&hub.admin_dir.clone().expect("admin bundle"))
        .expect("admin bundle loads");
    let channel = admin.connect(&hub.url()).await.expect("connect");

    // Health: the server and each of its services, SERVING once the store answered.
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "imgfleet.v1.AdminService", "imgfleet.v1.AgentService"] {
        let mut status = None;
        for _ in 0..100 {
            let answer = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await;
            status = Some(
                answer
                    .as_ref()
                    .map(|a| a.get_ref().status)
                    .map_err(|e| e.code()),
            );
            if status == Some(Ok(ServingStatus::Serving as i32)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            status,
            Some(Ok(ServingStatus::Serving as i32)),
            "health of {service:?}"
        );
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .expect_err("an unknown service is NOT_FOUND");
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // Reflection: the services, and the descriptors of the wire contract with its imports.
    let listed = reflect(channel.clone(), MessageRequest::ListServices(String::new()))
        .await
        .expect("list services");
    let MessageResponse::ListServicesResponse(list) = listed else {
        panic!("unexpected answer {listed:?}");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for want in ["imgfleet.v1.AdminService", "imgfleet.v1.AgentService"] {
        assert!(names.contains(&want), "{want} not in {names:?}");
    }
    let file = reflect(
        channel.clone(),
        MessageRequest::FileContainingSymbol("imgfleet.v1.AdminService".into()),
    )
    .await
    .expect("file containing AdminService");
    let MessageResponse::FileDescriptorResponse(files) = file else {
        panic!("unexpected answer {file:?}");
    };
    let files: Vec<String> = files
        .file_descriptor_proto
        .iter()
        .map(|b| {
            prost_types::FileDescriptorProto::decode(b.as_slice())
                .expect("a descriptor")
                .name()
                .to_string()
        })
        .collect();
    assert!(
        files.iter().any(|f| f == "imgfleet/v1/admin.proto"),
        "{files:?}"
    );
    // Its imports resolve too, so a generic client can build every message.
    let timestamp = reflect(
        channel.clone(),
        MessageRequest::FileByFilename("google/protobuf/timestamp.proto".into()),
    )
    .await
    .expect("an imported file");
    assert!(
        matches!(timestamp, MessageResponse::FileDescriptorResponse(_)),
        "{timestamp:?}"
    );

    // Without a client certificate: the handshake, or the first RPC, fails for both.
    let anonymous = tonic::transport::Endpoint::from_shared(hub.url())
        .expect("url")
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&admin.ca_pem)),
        )
        .expect("tls");
    if let Ok(ch) = anonymous.connect().await {
        let e = HealthClient::new(ch.clone())
            .check(HealthCheckRequest::default())
            .await
            .expect_err("no client certificate, no health");
        assert_ne!(e.code(), tonic::Code::Ok);
        let e = reflect(ch, MessageRequest::ListServices(String::new()))
            .await
            .expect_err("no client certificate, no reflection");
        assert_ne!(e.code(), tonic::Code::Ok);
    }
    hub.stop().await.expect("hub stops");
}

//! Command-line arguments of `imgfleet` and the verbs behind them.
//!
//! `validate` works offline. Every other verb validates locally first, then
//! talks to the hub's AdminService over mutually authenticated TLS ([`hub`]).
//! What is printed is built by the pure functions of [`format`].

// First, so that its print!/println!/eprint!/eprintln! shadow std's in every
// module below: a closed pipe then ends any command quietly.
#[macro_use]
mod output;
mod audit;
mod format;
mod hub;
mod rate;
mod rollout;
mod watch;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use imgfleet::api::v1 as pb;
use imgfleet::model::{self, Kind, Object};

/// Manage imgfleet: which container images go to which edge clusters.
#[derive(Parser, Debug)]
#[command(name = "imgfleet", version, about, propagate_version = true)]
pub struct Cli {
    /// URL of the hub's admin API.
    #[arg(
        long,
        global = true,
        env = "IMGFLEET_HUB",
        default_value = "https://127.0.0.1:7443"
    )]
    hub: String,
    /// Folder holding ca.pem, cert.pem and key.pem for mutual TLS with the hub.
    #[arg(long, global = true, env = "IMGFLEET_CREDENTIALS", value_name = "DIR")]
    credentials: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check resource files offline, without a hub. Exits 1 on any error.
    Validate {
        /// A YAML or JSON file, or - for standard input. May be repeated.
        #[arg(short = 'f', long = "filename", required = true, value_name = "FILE")]
        files: Vec<String>,
    },
    /// Create or update the objects of resource files on the hub.
    Apply {
        /// A YAML or JSON file, or - for standard input. May be repeated.
        #[arg(short = 'f', long = "filename", required = true, value_name = "FILE")]
        files: Vec<String>,
        /// Let the hub validate and default the objects without storing them.
        #[arg(long)]
        dry_run: bool,
    },
    /// List objects of a kind, or show one.
    Get(GetArgs),
    /// Show one object in detail, with its status per cluster.
    Describe {
        /// registrysecret (rs), repository (repo) or cluster.
        #[arg(value_parser = parse_kind)]
        kind: Kind,
        /// The object's name.
        name: String,
        /// Namespace of namespaced kinds.
        #[arg(short = 'n', long, default_value = model::DEFAULT_NAMESPACE)]
        namespace: String,
    },
    /// Delete one object by kind and name, or the objects of resource files.
    Delete {
        /// registrysecret (rs), repository (repo) or cluster.
        #[arg(value_parser = parse_kind, required_unless_present = "files", requires = "name")]
        kind: Option<Kind>,
        /// The object's name.
        name: Option<String>,
        /// Namespace of namespaced kinds.
        #[arg(short = 'n', long, default_value = model::DEFAULT_NAMESPACE)]
        namespace: String,
        /// Delete the objects of these files instead.
        #[arg(short = 'f', long = "filename", value_name = "FILE", conflicts_with_all = ["kind", "name"])]
        files: Vec<String>,
        /// Delete a RegistrySecret even though Repositories still use it; they then
        /// reach no cluster, and their status says the secret is gone.
        #[arg(long)]
        force: bool,
    },
    /// Follow the sync of Repositories across clusters: live progress bars on a terminal,
    /// plain lines otherwise.
    Watch {
        /// What to watch: repository (repo), the only kind that syncs.
        #[arg(value_parser = watch::parse_watch_kind, default_value = "repositories")]
        kind: Kind,
        /// Only this Repository.
        name: Option<String>,
        /// Namespace of the Repositories.
        #[arg(short = 'n', long, default_value = model::DEFAULT_NAMESPACE)]
        namespace: String,
        /// Watch every namespace.
        #[arg(short = 'A', long, conflicts_with = "name")]
        all_namespaces: bool,
        /// Exit 0 once every watched Repository is Synced on all the clusters it targets.
        #[arg(long)]
        until_synced: bool,
        /// Stop after this long, e.g. 30s, 5m; with --until-synced, exit 1 if not synced by then.
        #[arg(long, value_parser = parse_duration_arg)]
        timeout: Option<std::time::Duration>,
    },
    /// Manage edge clusters.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Issue and revoke user certificates (people and automation).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Read the hub's audit trail: changes and denied calls, never a secret.
    Audit {
        /// Only records newer than this, e.g. 1h, 30m, 7d.
        #[arg(long, value_parser = parse_duration_arg)]
        since: Option<std::time::Duration>,
        /// Only this user's records.
        #[arg(long)]
        user: Option<String>,
        /// Only this namespace's records.
        #[arg(short = 'n', long, conflicts_with = "all_namespaces")]
        namespace: Option<String>,
        /// Every namespace (and the fleet-wide records) you may read; the default.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// table, or json: one Kubernetes audit.k8s.io/v1 Event per line.
        #[arg(short = 'o', long, value_enum, default_value_t = AuditOutput::Table)]
        output: AuditOutput,
    },
    /// Ask the hub what you may do.
    Auth {
        #[command(subcommand)]
        command: AuthCommand,
    },
    /// A Repository's revisions: list them, roll back to one, resume.
    Rollout {
        #[command(subcommand)]
        command: rollout::RolloutCommand,
    },
}

#[derive(Subcommand, Debug)]
enum UserCommand {
    /// Write ca.pem, cert.pem and key.pem for a user. The key is made here and
    /// never sent: the hub signs a certificate request.
    Issue {
        /// The user name (the certificate's CN).
        name: String,
        /// A group (one O of the certificate). May be repeated.
        #[arg(long = "group", value_name = "GROUP")]
        groups: Vec<String>,
        /// Folder to write the credentials to; created with mode 0700.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Validity in days; the hub's default (365) when left out.
        #[arg(long)]
        validity_days: Option<u32>,
    },
    /// Refuse every certificate issued to a user so far.
    Revoke {
        /// The user name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum AuthCommand {
    /// Whether you may do VERB on KIND: prints yes (exit 0) or no (exit 1).
    CanI {
        /// get, list, watch, apply, delete, rollback, enroll, revoke or issue.
        verb: String,
        /// A kind (repositories, rs, clusters, rolebindings, ...), audit or users.
        resource: String,
        /// The namespace; leave out for fleet-wide kinds.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Register a cluster and write its agent's credentials (ca.pem, cert.pem, key.pem).
    Enroll {
        /// The cluster's name; the agent's certificate binds it.
        name: String,
        /// A label placements can select on, as key=value. May be repeated.
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// A namespace (tenant) allowed to target the cluster. May be repeated.
        #[arg(long = "namespace", value_name = "NS")]
        namespaces: Vec<String>,
        /// Folder to write the credentials to; created with mode 0700.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Validity of the certificate in days; the hub's default when left out.
        #[arg(long)]
        validity_days: Option<u32>,
        /// Re-enroll a cluster that exists: issue a new certificate and revoke the
        /// previous ones. Labels and tenants are kept unless --label or --namespace
        /// replace them.
        #[arg(long)]
        reissue: bool,
    },
    /// Refuse every certificate issued to a cluster so far, and end its agent's
    /// session. The agent keeps serving what it holds.
    Revoke {
        /// The cluster name.
        name: String,
    },
    /// Mint a token with which nodes pull one namespace's repositories from the
    /// cluster's mirror (agent started with --mirror-auth token).
    PullToken {
        /// The cluster name.
        name: String,
        /// The namespace (tenant) whose repositories the token reads.
        #[arg(long, value_name = "NS")]
        namespace: String,
        /// How long the token is valid, e.g. 720h or 30d.
        #[arg(long, value_parser = parse_duration_arg, default_value = "720h")]
        ttl: std::time::Duration,
        /// File to write the token to (mode 0600).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

/// How `audit` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AuditOutput {
    /// Aligned columns.
    Table,
    /// JSON lines in the shape of Kubernetes audit events.
    Json,
}

/// How `get` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns.
    Table,
    /// Aligned columns with extra details.
    Wide,
    /// The objects as YAML.
    Yaml,
    /// The objects as JSON.
    Json,
}

fn parse_duration_arg(text: &str) -> Result<std::time::Duration, String> {
    model::parse_duration(text).map_err(|e| format!("{text:?}: {e}"))
}

fn parse_kind(text: &str) -> Result<Kind, String> {
    Kind::parse(text).map_err(|e| e.to_string())
}

/// Parses arguments, runs the verb, and turns failures into `error: ...` and exit code 1.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // rustls is built with ring only; without an installed provider the first
    // TLS connection would panic.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    imgfleet::process::block_on_main(runtime, run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let target = hub::Target {
        url: cli.hub.clone(),
        credentials: cli.credentials.clone(),
    };
    match cli.command {
        Command::Validate { files } => validate(&files),
        Command::Apply { files, dry_run } => apply(&target, &files, dry_run).await,
        Command::Get(args) => get(&target, args).await,
        Command::Describe {
            kind,
            name,
            namespace,
        } => describe(&target, kind, &name, &namespace).await,
        Command::Delete {
            kind,
            name,
            namespace,
            files,
            force,
        } => delete(&target, kind, name, &namespace, &files, force).await,
        Command::Watch {
            kind: _,
            name,
            namespace,
            all_namespaces,
            until_synced,
            timeout,
        } => {
            watch::run(
                &target,
                watch::WatchArgs {
                    name,
                    namespace,
                    all_namespaces,
                    until_synced,
                    timeout,
                },
            )
            .await
        }
        Command::Cluster {
            command:
                ClusterCommand::Enroll {
                    name,
                    labels,
                    namespaces,
                    out,
                    validity_days,
                    reissue,
                },
        } => {
            enroll(
                &target,
                &name,
                &labels,
                &namespaces,
                &out,
                validity_days,
                reissue,
            )
            .await
        }
        Command::Cluster {
            command: ClusterCommand::Revoke { name },
        } => revoke(&target, Revoke::Cluster(name)).await,
        Command::Cluster {
            command:
                ClusterCommand::PullToken {
                    name,
                    namespace,
                    ttl,
                    out,
                },
        } => pull_token(&target, &name, &namespace, ttl, &out).await,
        Command::User {
            command:
                UserCommand::Issue {
                    name,
                    groups,
                    out,
                    validity_days,
                },
        } => issue_user(&target, &name, &groups, &out, validity_days).await,
        Command::User {
            command: UserCommand::Revoke { name },
        } => revoke(&target, Revoke::User(name)).await,
        Command::Auth {
            command:
                AuthCommand::CanI {
                    verb,
                    resource,
                    namespace,
                },
        } => can_i(&target, &verb, &resource, namespace.as_deref()).await,
        Command::Rollout { command } => rollout::run(&target, command).await,
        Command::Audit {
            since,
            user,
            namespace,
            all_namespaces,
            output,
        } => {
            audit_trail(
                &target,
                since,
                user,
                namespace.filter(|_| !all_namespaces),
                output,
            )
            .await
        }
    }
}

async fn audit_trail(
    target: &hub::Target,
    since: Option<std::time::Duration>,
    user: Option<String>,
    namespace: Option<String>,
    output: AuditOutput,
) -> anyhow::Result<ExitCode> {
    let since = since.map(|d| {
        let t = std::time::SystemTime::now()
            .checked_sub(d)
            .unwrap_or(std::time::UNIX_EPOCH)
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        prost_types::Timestamp {
            seconds: i64::try_from(t.as_secs()).unwrap_or(0),
            nanos: i32::try_from(t.subsec_nanos()).unwrap_or(0),
        }
    });
    let mut client = hub::connect(target).await?;
    let all = namespace.is_none();
    let events = client
        .query_audit(pb::AuditQuery {
            since,
            user: user.unwrap_or_default(),
            namespace: namespace.unwrap_or_default(),
            all_namespaces: all,
            limit: 0,
        })
        .await
        .map_err(|s| hub::status_error(s, "the audit trail", target))?
        .into_inner()
        .events;
    match output {
        AuditOutput::Table => print!("{}", audit::audit_table(&events)),
        AuditOutput::Json => {
            for e in &events {
                println!("{}", audit::to_k8s_event(e));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn issue_user(
    target: &hub::Target,
    name: &str,
    groups: &[String],
    out: &Path,
    validity_days: Option<u32>,
) -> anyhow::Result<ExitCode> {
    hub::prepare_credentials_dir(out)?;
    // The key is made here and stays here; the hub sees only the request.
    let key = rcgen::KeyPair::generate().context("generating a key pair")?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .context("making the certificate request")?;
    let mut client = hub::connect(target).await?;
    let what = format!("user {name}");
    let response = client
        .issue_user(pb::IssueUserRequest {
            name: name.to_owned(),
            groups: groups.to_vec(),
            validity_days: validity_days.unwrap_or(0),
            csr_pem: csr,
        })
        .await
        .map_err(|s| hub::status_error(s, &what, target))?
        .into_inner();
    hub::write_credentials(
        out,
        &response.ca_pem,
        &response.cert_pem,
        &key.serialize_pem(),
    )?;
    println!(
        "{what} issued; credentials in {} (ca.pem, cert.pem, key.pem): use them with --credentials {}",
        out.display(),
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

async fn pull_token(
    target: &hub::Target,
    cluster: &str,
    namespace: &str,
    ttl: std::time::Duration,
    out: &Path,
) -> anyhow::Result<ExitCode> {
    let mut client = hub::connect(target).await?;
    let what = format!("a pull token for {namespace} on Cluster {cluster}");
    let response = client
        .issue_pull_token(pb::PullTokenRequest {
            cluster: cluster.to_owned(),
            namespace: namespace.to_owned(),
            ttl_seconds: ttl.as_secs(),
        })
        .await
        .map_err(|s| hub::status_error(s, &what, target))?
        .into_inner();
    hub::write_secret_file(out, &response.token)?;
    println!(
        "{what} written to {} (valid {}); give it to the nodes with imgfleet-agent hosts-toml --token-file",
        out.display(),
        model::format_duration(ttl)
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug)]
enum Revoke {
    User(String),
    Cluster(String),
}

async fn revoke(target: &hub::Target, who: Revoke) -> anyhow::Result<ExitCode> {
    let who_kind = match &who {
        Revoke::User(_) => "user",
        Revoke::Cluster(_) => "cluster",
    };
    let mut client = hub::connect(target).await?;
    let (what, _response) = match who {
        Revoke::User(name) => {
            let what = format!("user {name}");
            let r = client
                .revoke_user(pb::RevokeUserRequest { name })
                .await
                .map_err(|s| hub::status_error(s, &what, target))?;
            (what, r.into_inner())
        }
        Revoke::Cluster(name) => {
            let what = model::object_id(Kind::Cluster, None, &name);
            let r = client
                .revoke_cluster(pb::RevokeClusterRequest { name })
                .await
                .map_err(|s| hub::status_error(s, &what, target))?;
            (what, r.into_inner())
        }
    };
    let sessions = if matches!(who_kind, "cluster") {
        "; its agent's live session ends within a second"
    } else {
        ""
    };
    println!("{what}: every certificate issued so far is revoked{sessions}");
    Ok(ExitCode::SUCCESS)
}

async fn can_i(
    target: &hub::Target,
    verb: &str,
    resource: &str,
    namespace: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let mut client = hub::connect(target).await?;
    let answer = client
        .can_i(pb::CanIRequest {
            verb: verb.to_owned(),
            resource: resource.to_owned(),
            namespace: namespace.unwrap_or_default().to_owned(),
        })
        .await
        .map_err(|s| hub::status_error(s, "the question", target))?
        .into_inner();
    if answer.allowed {
        println!("yes");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("no");
        Ok(ExitCode::FAILURE)
    }
}

/// Reads a file, or standard input for `-`; returns (label for messages, text).
fn read_input(file: &str) -> anyhow::Result<(String, String)> {
    if file == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read standard input")?;
        Ok(("<stdin>".to_owned(), text))
    } else {
        let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {file}"))?;
        Ok((file.to_owned(), text))
    }
}

/// Reads and checks every file; returns the valid objects and the error lines.
fn check_files(files: &[String]) -> anyhow::Result<(Vec<Object>, Vec<String>)> {
    let mut objects: Vec<Object> = Vec::new();
    let mut errors = Vec::new();
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for file in files {
        let (label, text) = read_input(file)?;
        let checked = model::check_documents(&text);
        if checked.objects.is_empty() && checked.errors.is_empty() {
            errors.push(format!(
                "{label}: no objects found; expected at least one RegistrySecret, Repository or Cluster"
            ));
        }
        errors.extend(checked.errors.iter().map(|e| format!("{label}: {e}")));
        for object in checked.objects {
            let id = object.id();
            if let Some(first) = seen.get(&id) {
                errors.push(format!(
                    "{label}: {id}: also defined in {first}; expected each object once"
                ));
            } else {
                seen.insert(id, label.clone());
                objects.push(object);
            }
        }
    }
    Ok((objects, errors))
}

/// The objects of every file when all of them are valid; otherwise prints each problem
/// and fails with nothing `done` (a verb that changes the hub does all or nothing).
fn valid_objects(files: &[String], done: &str) -> anyhow::Result<Vec<Object>> {
    let (objects, errors) = check_files(files)?;
    if errors.is_empty() {
        return Ok(objects);
    }
    for e in &errors {
        eprintln!("{e}");
    }
    bail!(
        "nothing {done}: fix the {} problem(s) above first",
        errors.len()
    );
}

fn validate(files: &[String]) -> anyhow::Result<ExitCode> {
    let (objects, errors) = check_files(files)?;
    for object in &objects {
        println!("{}: valid", object.id());
    }
    for e in &errors {
        eprintln!("{e}");
    }
    if errors.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "error: {} problem{} found",
            errors.len(),
            if errors.len() == 1 { "" } else { "s" }
        );
        Ok(ExitCode::FAILURE)
    }
}

async fn apply(target: &hub::Target, files: &[String], dry_run: bool) -> anyhow::Result<ExitCode> {
    let mut objects = valid_objects(files, "applied")?;
    if objects.is_empty() {
        bail!("nothing to apply: the input holds no objects");
    }
    // RegistrySecrets before the Repositories that refer to them.
    objects.sort_by_key(Object::kind);
    let mut client = hub::connect(target).await?;
    let mut failed = 0;
    for object in &objects {
        let request = pb::ApplyRequest {
            object: Some(pb::Object::from(object)),
            dry_run,
        };
        match client.apply(request).await {
            Ok(response) => {
                let outcome = pb::ApplyOutcome::try_from(response.get_ref().outcome)
                    .unwrap_or(pb::ApplyOutcome::Unspecified);
                println!("{}", format::apply_line(&object.id(), outcome, dry_run));
            }
            Err(status) => {
                failed += 1;
                eprintln!(
                    "error: {:#}",
                    hub::status_error(status, &object.id(), target)
                );
            }
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What `imgfleet get` lists or shows.
#[derive(Args, Debug)]
struct GetArgs {
    /// registrysecret (rs), repository (repo) or cluster, singular or plural.
    #[arg(value_parser = parse_kind)]
    kind: Kind,
    /// Show only this object.
    name: Option<String>,
    /// Namespace of namespaced kinds.
    #[arg(short = 'n', long, default_value = model::DEFAULT_NAMESPACE)]
    namespace: String,
    /// List across every namespace.
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Label selector, e.g. env=prod,tier in (a,b).
    #[arg(short = 'l', long)]
    selector: Option<String>,
}

fn namespace_for(kind: Kind, namespace: &str) -> String {
    if kind.namespaced() {
        namespace.to_owned()
    } else {
        String::new()
    }
}

async fn get(target: &hub::Target, args: GetArgs) -> anyhow::Result<ExitCode> {
    let mut client = hub::connect(target).await?;
    let kind = args.kind;
    let objects: Vec<Object> = if let Some(name) = &args.name {
        vec![get_object(&mut client, target, kind, &args.namespace, name).await?]
    } else {
        let request = pb::ListRequest {
            kind: pb::Kind::from(kind) as i32,
            namespace: namespace_for(kind, &args.namespace),
            all_namespaces: args.all_namespaces,
            label_selector: args.selector.clone().unwrap_or_default(),
        };
        let what = format!("{} list", kind.plural());
        let response = client
            .list(request)
            .await
            .map_err(|s| hub::status_error(s, &what, target))?
            .into_inner();
        response
            .items
            .into_iter()
            .map(Object::try_from)
            .collect::<Result<_, _>>()
            .context("the hub sent an object this CLI cannot read")?
    };
    let objects: Vec<Object> = objects.iter().map(Object::redacted).collect();
    let now = k8s_openapi::jiff::Timestamp::now();
    match args.output {
        Output::Table | Output::Wide => {
            if objects.is_empty() {
                if kind.namespaced() && !args.all_namespaces {
                    eprintln!(
                        "No {} found in namespace {}.",
                        kind.plural(),
                        args.namespace
                    );
                } else {
                    eprintln!("No {} found.", kind.plural());
                }
            } else {
                print!(
                    "{}",
                    format::table_for(kind, &objects, args.output == Output::Wide, now)
                );
            }
        }
        Output::Yaml => print!("{}", format::to_yaml(&objects, args.name.is_some())?),
        Output::Json => println!("{}", format::to_json(&objects, args.name.is_some())?),
    }
    Ok(ExitCode::SUCCESS)
}

/// One object from the hub; a refusal names the object.
async fn get_object(
    client: &mut hub::Client,
    target: &hub::Target,
    kind: Kind,
    namespace: &str,
    name: &str,
) -> anyhow::Result<Object> {
    let id = model::object_id(kind, kind.namespaced().then_some(namespace), name);
    let request = pb::GetRequest {
        kind: pb::Kind::from(kind) as i32,
        namespace: namespace_for(kind, namespace),
        name: name.to_owned(),
    };
    let object = client
        .get(request)
        .await
        .map_err(|s| hub::status_error(s, &id, target))?
        .into_inner();
    Object::try_from(object).context("the hub sent an object this CLI cannot read")
}

async fn describe(
    target: &hub::Target,
    kind: Kind,
    name: &str,
    namespace: &str,
) -> anyhow::Result<ExitCode> {
    let mut client = hub::connect(target).await?;
    let object = get_object(&mut client, target, kind, namespace, name).await?;
    print!(
        "{}",
        format::describe(&object.redacted(), k8s_openapi::jiff::Timestamp::now())
    );
    Ok(ExitCode::SUCCESS)
}

async fn delete(
    target: &hub::Target,
    kind: Option<Kind>,
    name: Option<String>,
    namespace: &str,
    files: &[String],
    force: bool,
) -> anyhow::Result<ExitCode> {
    let targets: Vec<(Kind, String, String)> = if files.is_empty() {
        let (Some(kind), Some(name)) = (kind, name) else {
            bail!("expected KIND NAME or -f FILE");
        };
        vec![(kind, namespace_for(kind, namespace), name)]
    } else {
        let mut objects = valid_objects(files, "deleted")?;
        // Repositories before the RegistrySecrets they refer to.
        objects.sort_by_key(|o| std::cmp::Reverse(o.kind()));
        objects
            .iter()
            .map(|o| {
                (
                    o.kind(),
                    o.namespace().unwrap_or_default().to_owned(),
                    o.name().to_owned(),
                )
            })
            .collect()
    };
    let mut client = hub::connect(target).await?;
    let mut failed = 0;
    for (kind, namespace, name) in targets {
        let id = model::object_id(kind, kind.namespaced().then_some(namespace.as_str()), &name);
        let request = pb::DeleteRequest {
            kind: pb::Kind::from(kind) as i32,
            namespace,
            name,
            resource_version: String::new(),
            force,
        };
        match client.delete(request).await {
            Ok(_) => println!("{id} deleted"),
            Err(status) => {
                failed += 1;
                eprintln!("error: {:#}", hub::status_error(status, &id, target));
            }
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Parses `key=value` labels of `cluster enroll`.
fn parse_labels(labels: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for label in labels {
        let (k, v) = label
            .split_once('=')
            .ok_or_else(|| anyhow!("--label {label:?}: expected key=value, e.g. region=east"))?;
        if out.insert(k.to_owned(), v.to_owned()).is_some() {
            bail!("--label {k:?} given twice; expected each key once");
        }
    }
    Ok(out)
}

async fn enroll(
    target: &hub::Target,
    name: &str,
    labels: &[String],
    namespaces: &[String],
    out: &Path,
    validity_days: Option<u32>,
    reissue: bool,
) -> anyhow::Result<ExitCode> {
    let labels = parse_labels(labels)?;
    let replace_labels = reissue && !labels.is_empty();
    // Check name, labels and tenants with the same rules as a Cluster file.
    let cluster = model::Cluster {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(labels.clone()),
            ..Default::default()
        },
        spec: model::ClusterSpec {
            tenants: namespaces.to_vec(),
            description: None,
        },
        status: None,
    };
    if let Err(errors) = Object::Cluster(cluster).validate() {
        for e in &errors {
            eprintln!("{e}");
        }
        bail!(
            "cluster not enrolled: fix the {} problem(s) above first",
            errors.len()
        );
    }
    // The hub returns the private key once and keeps no copy, so make sure it
    // can be written before asking for it.
    hub::prepare_credentials_dir(out)?;
    let mut client = hub::connect(target).await?;
    let id = model::object_id(Kind::Cluster, None, name);
    let response = client
        .enroll_cluster(pb::EnrollClusterRequest {
            name: name.to_owned(),
            labels: labels.into_iter().collect(),
            tenants: namespaces.to_vec(),
            validity_days: validity_days.unwrap_or(0),
            reissue,
            replace_labels,
            replace_tenants: reissue && !namespaces.is_empty(),
        })
        .await
        .map_err(|s| hub::status_error(s, &id, target))?
        .into_inner();
    hub::write_credentials(out, &response.ca_pem, &response.cert_pem, &response.key_pem)?;
    println!(
        "{id} enrolled; its agent's credentials are in {} (ca.pem, cert.pem, key.pem)",
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn arguments_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn kinds_and_flags_parse() {
        let cli =
            Cli::try_parse_from(["imgfleet", "get", "repo", "-A", "-o", "wide"]).expect("parses");
        match cli.command {
            Command::Get(GetArgs {
                kind,
                all_namespaces,
                output,
                ..
            }) => {
                assert_eq!(kind, Kind::Repository);
                assert!(all_namespaces);
                assert_eq!(output, Output::Wide);
            }
            other => panic!("{other:?}"),
        }
        let e = Cli::try_parse_from(["imgfleet", "get", "foo"]).expect_err("bad kind");
        assert!(
            e.to_string()
                .contains(r#"unknown kind "foo": expected one of registrysecret (rs), repository (repo), cluster"#),
            "{e}"
        );
        assert!(Cli::try_parse_from(["imgfleet", "delete", "rs"]).is_err());
        assert!(Cli::try_parse_from(["imgfleet", "delete", "-f", "x.yaml"]).is_ok());
        assert!(Cli::try_parse_from(["imgfleet", "delete", "rs", "x"]).is_ok());
    }

    #[test]
    fn labels_parse() {
        let labels = parse_labels(&["region=east".into(), "tier=".into()]).expect("valid");
        assert_eq!(labels.get("region").map(String::as_str), Some("east"));
        assert_eq!(labels.get("tier").map(String::as_str), Some(""));
        let e = parse_labels(&["region".into()]).expect_err("no =");
        assert!(e.to_string().contains("expected key=value"));
    }
}

//! `imgfleet rollout history|undo|resume repository NAME`: a Repository's
//! revisions, rolling back to one (pinned, so tag moves upstream are
//! recorded but not shipped), and resuming.

use std::process::ExitCode;

use clap::Subcommand;
use imgfleet::api::v1 as pb;
use imgfleet::model::{self, Kind};

use super::{format, hub};

#[derive(Subcommand, Debug)]
pub enum RolloutCommand {
    /// List a Repository's revisions: the digests, when and why each came,
    /// who made it, and which clusters still hold it.
    History {
        /// repository (repo): the only kind with revisions.
        #[arg(value_parser = parse_rollout_kind)]
        kind: Kind,
        /// The Repository's name.
        name: String,
        /// Its namespace.
        #[arg(short = 'n', long, default_value = model::DEFAULT_NAMESPACE)]
        namespace: String,
        /// Show whole digests.
        #[arg(long)]
        wide: bool,
    },
    /// Ship an earlier revision's digests to every cluster and pin the
    /// Repository there. Clusters that still hold it switch without
    /// fetching anything, even with the upstream registry down.
    Undo {
        /// repository (repo).
        #[arg(value_parser = parse_rollout_kind)]
        kind: Kind,
        /// The Repository's name.
        name: String,
        /// Its namespace.
        #[arg(short = 'n', long, default_value = model::DEFAULT_NAMESPACE)]
        namespace: String,
        /// The revision to go back to (see `rollout history`); default: the
        /// previous one that shipped.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        to_revision: Option<u32>,
    },
    /// Unpin a Repository: the newest revision its tags resolved to ships again.
    Resume {
        /// repository (repo).
        #[arg(value_parser = parse_rollout_kind)]
        kind: Kind,
        /// The Repository's name.
        name: String,
        /// Its namespace.
        #[arg(short = 'n', long, default_value = model::DEFAULT_NAMESPACE)]
        namespace: String,
    },
}

fn parse_rollout_kind(text: &str) -> Result<Kind, String> {
    match Kind::parse(text) {
        Ok(Kind::Repository) => Ok(Kind::Repository),
        Ok(other) => Err(format!(
            "{} have no rollouts: expected repository (repo)",
            other.plural()
        )),
        Err(e) => Err(e.to_string()),
    }
}

pub async fn run(target: &hub::Target, command: RolloutCommand) -> anyhow::Result<ExitCode> {
    let mut client = hub::connect(target).await?;
    match command {
        RolloutCommand::History {
            kind: _,
            name,
            namespace,
            wide,
        } => {
            let id = format!("{namespace}/{name}");
            let what = format!("the history of Repository {id}");
            let history = client
                .rollout_history(pb::RolloutRequest { namespace, name })
                .await
                .map_err(|s| hub::status_error(s, &what, target))?
                .into_inner();
            let now = k8s_openapi::jiff::Timestamp::now();
            print!("{}", format::rollout_history(&id, &history, wide, now));
        }
        RolloutCommand::Undo {
            kind: _,
            name,
            namespace,
            to_revision,
        } => {
            let id = format!("{namespace}/{name}");
            let what = format!("the rollback of Repository {id}");
            let r = client
                .rollout_undo(pb::RolloutUndoRequest {
                    namespace,
                    name,
                    to_revision: to_revision.unwrap_or(0),
                })
                .await
                .map_err(|s| hub::status_error(s, &what, target))?
                .into_inner();
            println!("repository {id}: {}", r.message);
        }
        RolloutCommand::Resume {
            kind: _,
            name,
            namespace,
        } => {
            let id = format!("{namespace}/{name}");
            let what = format!("resuming Repository {id}");
            let r = client
                .rollout_resume(pb::RolloutRequest { namespace, name })
                .await
                .map_err(|s| hub::status_error(s, &what, target))?
                .into_inner();
            println!("repository {id}: {}", r.message);
        }
    }
    Ok(ExitCode::SUCCESS)
}

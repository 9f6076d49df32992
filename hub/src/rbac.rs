//! Who may do what: the built-in roles, the bindings that give them, and the
//! one decision every AdminService call goes through.
//!
//! Pure: [`Grants::of`] turns a user (certificate CN and groups) and the
//! stored bindings into the roles the user holds, and [`Grants::allows`]
//! answers one question (verb, resource, namespace). Everything is denied
//! unless a role allows it. The admin service loads the bindings and asks;
//! nothing else decides.

use std::collections::BTreeMap;
use std::fmt;

use imgfleet::model::{Kind, Object, Role, Subject};
use imgfleet_common::pki::User;

/// What a caller wants to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verb {
    Get,
    List,
    Watch,
    Apply,
    Delete,
    Rollback,
    Enroll,
    Revoke,
    Issue,
}

impl Verb {
    pub const ALL: [Verb; 9] = [
        Verb::Get,
        Verb::List,
        Verb::Watch,
        Verb::Apply,
        Verb::Delete,
        Verb::Rollback,
        Verb::Enroll,
        Verb::Revoke,
        Verb::Issue,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Apply => "apply",
            Verb::Delete => "delete",
            Verb::Rollback => "rollback",
            Verb::Enroll => "enroll",
            Verb::Revoke => "revoke",
            Verb::Issue => "issue",
        }
    }

    pub fn parse(text: &str) -> Option<Verb> {
        let t = text.to_ascii_lowercase();
        // kubectl's words for the same rights.
        let t = match t.as_str() {
            "create" | "update" | "patch" => "apply",
            other => other,
        };
        Verb::ALL.into_iter().find(|v| v.as_str() == t)
    }

    /// Whether the verb only reads.
    pub fn reads(self) -> bool {
        matches!(self, Verb::Get | Verb::List | Verb::Watch)
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a verb applies to: an object kind, the audit trail, or users
/// (their certificates).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Kind(Kind),
    Audit,
    Users,
    /// Pull tokens for a namespace's repositories on a cluster's mirror.
    PullTokens,
}

impl Resource {
    /// The plural name used in messages and by `auth can-i`.
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Kind(k) => k.plural(),
            Resource::Audit => "audit",
            Resource::Users => "users",
            Resource::PullTokens => "pulltokens",
        }
    }

    /// A resource as typed: a kind in any of its forms, `audit` or `users`.
    pub fn parse(text: &str) -> Option<Resource> {
        match text.to_ascii_lowercase().as_str() {
            "audit" | "auditevents" | "events" => Some(Resource::Audit),
            "user" | "users" => Some(Resource::Users),
            "pulltoken" | "pulltokens" => Some(Resource::PullTokens),
            other => Kind::parse(other).ok().map(Resource::Kind),
        }
    }

    /// Whether the resource lives in namespaces. The audit trail is read per
    /// namespace by namespace admins, and as a whole by fleet roles.
    pub fn namespaced(self) -> bool {
        match self {
            Resource::Kind(k) => k.namespaced(),
            Resource::Audit | Resource::PullTokens => true,
            Resource::Users => false,
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one role allows on one resource, independent of namespaces: the
/// ladder of the built-in roles.
pub fn role_allows(role: Role, verb: Verb, resource: Resource) -> bool {
    let policy = matches!(
        resource,
        Resource::Kind(Kind::RegistrySecret | Kind::Repository)
    );
    match role {
        Role::Viewer => policy && verb.reads(),
        Role::Editor => {
            policy && (verb.reads() || matches!(verb, Verb::Apply | Verb::Delete | Verb::Rollback))
        }
        Role::Admin => {
            role_allows(Role::Editor, verb, resource)
                || (resource == Resource::Kind(Kind::RoleBinding)
                    && (verb.reads() || matches!(verb, Verb::Apply | Verb::Delete)))
                || (resource == Resource::Audit && matches!(verb, Verb::Get | Verb::List))
                || (resource == Resource::PullTokens && verb == Verb::Issue)
        }
        Role::ClusterViewer => verb.reads(),
        Role::ClusterAdmin => true,
    }
}

/// The bindings as the authorizer needs them.
#[derive(Debug, Clone, Default)]
pub struct Bindings {
    /// (namespace, role, subjects) of each RoleBinding.
    pub namespaced: Vec<(String, Role, Vec<Subject>)>,
    /// (role, subjects) of each ClusterRoleBinding.
    pub fleet: Vec<(Role, Vec<Subject>)>,
}

impl Bindings {
    /// The bindings among stored objects; bindings with a role that does not
    /// parse (they were validated, so none) are skipped.
    pub fn from_objects<'a>(objects: impl IntoIterator<Item = &'a Object>) -> Bindings {
        let mut out = Bindings::default();
        for o in objects {
            match o {
                Object::RoleBinding(b) => {
                    if let Some(role) = Role::parse(&b.spec.role).filter(|r| !r.fleet_wide()) {
                        out.namespaced.push((
                            o.namespace().unwrap_or_default().to_owned(),
                            role,
                            b.spec.subjects.clone(),
                        ));
                    }
                }
                Object::ClusterRoleBinding(b) => {
                    if let Some(role) = Role::parse(&b.spec.role).filter(|r| r.fleet_wide()) {
                        out.fleet.push((role, b.spec.subjects.clone()));
                    }
                }
                _ => {}
            }
        }
        out
    }
}

fn names(user: &User, subjects: &[Subject]) -> bool {
    subjects.iter().any(|s| match s.kind.as_str() {
        "User" => s.name == user.name,
        "Group" => user.groups.contains(&s.name),
        _ => false,
    })
}

/// The roles one user holds: the highest fleet-wide one, and the highest in
/// each namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    pub fleet: Option<Role>,
    pub namespaces: BTreeMap<String, Role>,
}

impl Grants {
    /// The roles `user` holds under `bindings`. The built-in admin group
    /// holds cluster-admin without any binding.
    pub fn of(user: &User, bindings: &Bindings) -> Grants {
        let mut g = Grants::default();
        if user.is_builtin_admin() {
            g.fleet = Some(Role::ClusterAdmin);
        }
        for (role, subjects) in &bindings.fleet {
            if names(user, subjects) {
                g.fleet = g.fleet.max(Some(*role));
            }
        }
        for (ns, role, subjects) in &bindings.namespaced {
            if names(user, subjects) {
                let e = g.namespaces.entry(ns.clone()).or_insert(*role);
                *e = (*e).max(*role);
            }
        }
        g
    }

    /// Only the built-in admin group: what is known without reading bindings.
    pub fn builtin(user: &User) -> Option<Grants> {
        user.is_builtin_admin().then(|| Grants {
            fleet: Some(Role::ClusterAdmin),
            namespaces: BTreeMap::new(),
        })
    }

    /// Whether `verb` on `resource` in `namespace` (None: fleet-wide) is allowed.
    pub fn allows(&self, verb: Verb, resource: Resource, namespace: Option<&str>) -> bool {
        if self.fleet.is_some_and(|r| role_allows(r, verb, resource)) {
            return true;
        }
        match namespace {
            Some(ns) if resource.namespaced() => self
                .namespaces
                .get(ns)
                .is_some_and(|r| role_allows(*r, verb, resource)),
            _ => false,
        }
    }

    /// The highest role the user holds in `namespace`, counting fleet roles.
    pub fn role_in(&self, namespace: &str) -> Option<Role> {
        self.fleet.max(self.namespaces.get(namespace).copied())
    }

    /// Whether the user may give `role` to others in `namespace` (None: a
    /// ClusterRoleBinding): never a role above their own.
    pub fn may_grant(&self, role: Role, namespace: Option<&str>) -> bool {
        if self.fleet == Some(Role::ClusterAdmin) {
            return true;
        }
        match namespace {
            // cluster-viewer gives no right to write, so only cluster-admin
            // manages ClusterRoleBindings.
            None => false,
            Some(ns) => self
                .namespaces
                .get(ns)
                .is_some_and(|own| !role.fleet_wide() && role <= *own),
        }
    }
}

/// The denial message: "user-a may not apply repositories in namespace team-b".
pub fn denial(user: &str, verb: Verb, resource: Resource, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) if resource.namespaced() => {
            format!("{user} may not {verb} {resource} in namespace {ns}")
        }
        _ => format!("{user} may not {verb} {resource}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, groups: &[&str]) -> User {
        User {
            name: name.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    fn subject(kind: &str, name: &str) -> Subject {
        Subject {
            kind: kind.into(),
            name: name.into(),
        }
    }

    fn bindings() -> Bindings {
        Bindings {
            namespaced: vec![
                (
                    "team-a".into(),
                    Role::Editor,
                    vec![subject("Group", "dev"), subject("User", "user-c")],
                ),
                ("team-a".into(), Role::Admin, vec![subject("User", "lead")]),
                ("team-b".into(), Role::Viewer, vec![subject("Group", "dev")]),
            ],
            fleet: vec![(Role::ClusterViewer, vec![subject("User", "auditor")])],
        }
    }

    /// One row: user, verb, resource, namespace, expected.
    fn check(u: &User, verb: Verb, res: Resource, ns: Option<&str>, want: bool) {
        let g = Grants::of(u, &bindings());
        assert_eq!(
            g.allows(verb, res, ns),
            want,
            "{} {verb} {res} {ns:?}",
            u.name
        );
    }

    #[test]
    fn the_ladder() {
        let repos = Resource::Kind(Kind::Repository);
        let rs = Resource::Kind(Kind::RegistrySecret);
        let clusters = Resource::Kind(Kind::Cluster);
        let rb = Resource::Kind(Kind::RoleBinding);
        let crb = Resource::Kind(Kind::ClusterRoleBinding);
        let a = user("user-a", &["dev"]);
        check(&a, Verb::Apply, repos, Some("team-a"), true);
        check(&a, Verb::Delete, rs, Some("team-a"), true);
        check(&a, Verb::Rollback, repos, Some("team-a"), true);
        check(&a, Verb::Apply, repos, Some("team-b"), false);
        check(&a, Verb::Get, repos, Some("team-b"), true);
        check(&a, Verb::Get, repos, Some("team-c"), false);
        check(&a, Verb::Enroll, clusters, None, false);
        check(&a, Verb::Get, clusters, None, false);
        check(&a, Verb::Apply, rb, Some("team-a"), false);
        check(&a, Verb::List, Resource::Audit, Some("team-a"), false);
        let lead = user("lead", &[]);
        check(&lead, Verb::Apply, rb, Some("team-a"), true);
        check(&lead, Verb::List, Resource::Audit, Some("team-a"), true);
        check(&lead, Verb::List, Resource::Audit, None, false);
        check(&lead, Verb::Apply, crb, None, false);
        check(
            &lead,
            Verb::Issue,
            Resource::PullTokens,
            Some("team-a"),
            true,
        );
        check(
            &lead,
            Verb::Issue,
            Resource::PullTokens,
            Some("team-b"),
            false,
        );
        check(&a, Verb::Issue, Resource::PullTokens, Some("team-a"), false);
        let auditor = user("auditor", &[]);
        check(&auditor, Verb::List, clusters, None, true);
        check(&auditor, Verb::Get, repos, Some("anything"), true);
        check(&auditor, Verb::List, Resource::Audit, None, true);
        check(&auditor, Verb::Apply, repos, Some("team-a"), false);
        check(&auditor, Verb::Issue, Resource::Users, None, false);
        let admin = user("admin", &[imgfleet_common::pki::ADMIN_ORGANIZATION]);
        for verb in Verb::ALL {
            check(&admin, verb, clusters, None, true);
            check(&admin, verb, Resource::Users, None, true);
        }
        // Nobody else: deny by default.
        let stranger = user("stranger", &["dev2"]);
        for verb in Verb::ALL {
            check(&stranger, verb, repos, Some("team-a"), false);
            check(&stranger, verb, clusters, None, false);
        }
    }

    #[test]
    fn nobody_grants_above_their_own() {
        let lead = Grants::of(&user("lead", &[]), &bindings());
        assert!(lead.may_grant(Role::Admin, Some("team-a")));
        assert!(lead.may_grant(Role::Viewer, Some("team-a")));
        assert!(!lead.may_grant(Role::ClusterViewer, Some("team-a")));
        assert!(!lead.may_grant(Role::Viewer, Some("team-b")));
        assert!(!lead.may_grant(Role::ClusterViewer, None));
        let a = Grants::of(&user("user-a", &["dev"]), &bindings());
        assert!(!a.may_grant(Role::Admin, Some("team-a")));
        assert!(a.may_grant(Role::Editor, Some("team-a")));
        let admin = Grants::of(
            &user("admin", &[imgfleet_common::pki::ADMIN_ORGANIZATION]),
            &bindings(),
        );
        assert!(admin.may_grant(Role::ClusterAdmin, None));
    }

    #[test]
    fn denial_names_user_verb_kind_and_namespace() {
        assert_eq!(
            denial(
                "user-a",
                Verb::Apply,
                Resource::Kind(Kind::Repository),
                Some("team-b")
            ),
            "user-a may not apply repositories in namespace team-b"
        );
        assert_eq!(
            denial("user-a", Verb::Enroll, Resource::Kind(Kind::Cluster), None),
            "user-a may not enroll clusters"
        );
        assert_eq!(Verb::parse("create"), Some(Verb::Apply));
        assert_eq!(
            Resource::parse("repo"),
            Some(Resource::Kind(Kind::Repository))
        );
        assert_eq!(
            Resource::parse("rb"),
            Some(Resource::Kind(Kind::RoleBinding))
        );
    }
}

//! Who may reach which resource: groups (and, for callers without groups, subjects) mapped to
//! resource names, `*` meaning every resource.

use custody_proto::Identity;

use crate::config::PolicyConfig;

fn grants(list: Option<&Vec<String>>, resource: &str) -> bool {
    list.is_some_and(|l| l.iter().any(|r| r == "*" || r == resource))
}

/// Whether `id` may reach `resource`.
pub fn allows(policy: &PolicyConfig, id: &Identity, resource: &str) -> bool {
    id.groups.iter().any(|g| grants(policy.groups.get(g), resource))
        || grants(policy.subjects.get(&id.subject), resource)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_and_subjects_grant_access() {
        let mut p = PolicyConfig::default();
        p.groups.insert("dba".into(), vec!["pg-prod".into()]);
        p.groups.insert("admins".into(), vec!["*".into()]);
        p.subjects.insert("ci-bot".into(), vec!["pg-ci".into()]);
        let id = |groups: &[&str], sub: &str| Identity {
            subject: sub.into(),
            groups: groups.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        assert!(allows(&p, &id(&["dba"], "a"), "pg-prod"));
        assert!(!allows(&p, &id(&["dba"], "a"), "pg-ci"));
        assert!(allows(&p, &id(&["admins"], "a"), "anything"));
        assert!(allows(&p, &id(&[], "ci-bot"), "pg-ci"));
        assert!(!allows(&p, &id(&[], "someone"), "pg-ci"));
        assert!(!allows(&p, &id(&["DBA"], "a"), "pg-prod"), "group names are case-sensitive");
    }
}

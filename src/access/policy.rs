//! Who may pull what, from where: rules mapping identities (users, token names, groups,
//! anonymous, mTLS subjects) and client networks to upstream + repository globs. Once access
//! control is on, whatever no rule allows is denied. Pure: no IO, decided before the cache or an
//! upstream is asked anything.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

use super::Identity;

/// One `access.rules[]` entry as written in the config.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Identities the rule applies to: `anonymous`, `authenticated`, `user:NAME`, `token:NAME`,
    /// `group:NAME`, `subject:CERT-SUBJECT`.
    pub who: Vec<String>,
    /// Client networks (CIDRs) the rule is limited to; empty means any address.
    #[serde(default)]
    pub networks: Vec<IpNet>,
    /// `upstream/repository` globs: `*` matches within one path component, `**` across them,
    /// e.g. `docker.io/library/*`, `ghcr.io/acme/**`. Docker Hub names carry `library/`.
    pub repositories: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Who {
    Anonymous,
    Authenticated,
    User(String),
    Token(String),
    Group(String),
    Subject(String),
}

impl Who {
    fn parse(s: &str) -> Result<Who, String> {
        let s = s.trim();
        match s {
            "anonymous" => return Ok(Who::Anonymous),
            "authenticated" => return Ok(Who::Authenticated),
            _ => {}
        }
        let (kind, name) = s.split_once(':').ok_or_else(|| {
            format!(
                "`{s}` is not one of anonymous, authenticated, user:NAME, token:NAME, group:NAME, subject:SUBJECT"
            )
        })?;
        if name.is_empty() {
            return Err(format!("`{s}` names nobody"));
        }
        let name = name.to_owned();
        match kind {
            "user" => Ok(Who::User(name)),
            "token" => Ok(Who::Token(name)),
            "group" => Ok(Who::Group(name)),
            "subject" => Ok(Who::Subject(name)),
            _ => Err(format!(
                "`{s}`: unknown kind `{kind}` (user, token, group or subject)"
            )),
        }
    }
}

/// A compiled `upstream/repository` glob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    pub fn parse(s: &str) -> Result<Glob, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("an empty repository pattern matches nothing".into());
        }
        if !s.contains('/') && s != "**" {
            return Err(format!(
                "`{s}` must start with the upstream's name, e.g. `docker.io/library/*` or `{s}/**`"
            ));
        }
        if s.contains("***") {
            return Err(format!("`{s}`: use `*` or `**`"));
        }
        Ok(Glob(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `target` (`upstream/repository`) matches.
    pub fn matches(&self, target: &str) -> bool {
        glob_match(self.0.as_bytes(), target.as_bytes())
    }
}

fn glob_match(p: &[u8], t: &[u8]) -> bool {
    match p {
        [] => t.is_empty(),
        [b'*', b'*', rest @ ..] => (0..=t.len()).any(|i| glob_match(rest, &t[i..])),
        [b'*', rest @ ..] => {
            let stop = t.iter().position(|&c| c == b'/').unwrap_or(t.len());
            (0..=stop).any(|i| glob_match(rest, &t[i..]))
        }
        [c, rest @ ..] => t.first() == Some(c) && glob_match(rest, &t[1..]),
    }
}

#[derive(Clone, Debug)]
struct Rule {
    who: Vec<Who>,
    networks: Vec<IpNet>,
    repositories: Vec<Glob>,
}

/// The compiled rules and groups.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    rules: Vec<Rule>,
    /// Group name -> members (`user:..`, `token:..`, `subject:..`).
    groups: BTreeMap<String, Vec<Who>>,
}

impl Policy {
    /// Compiles the config; errors are `(key, reason)` for `config::Error::Invalid`.
    pub fn compile(
        rules: &[RuleConfig],
        groups: &BTreeMap<String, Vec<String>>,
    ) -> Result<Policy, (String, String)> {
        let mut compiled_groups = BTreeMap::new();
        for (name, members) in groups {
            let key = format!("access.groups.{name}");
            let mut list = Vec::new();
            for m in members {
                let who = Who::parse(m).map_err(|r| (key.clone(), r))?;
                match who {
                    Who::User(_) | Who::Token(_) | Who::Subject(_) => list.push(who),
                    _ => {
                        return Err((
                            key,
                            format!("`{m}`: group members are user:, token: or subject: entries"),
                        ));
                    }
                }
            }
            compiled_groups.insert(name.clone(), list);
        }
        let mut compiled = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            let key = |f: &str| format!("access.rules[{i}].{f}");
            if r.who.is_empty() {
                return Err((key("who"), "must name at least one identity".into()));
            }
            if r.repositories.is_empty() {
                return Err((key("repositories"), "must name at least one pattern".into()));
            }
            let mut who = Vec::new();
            for w in &r.who {
                let parsed = Who::parse(w).map_err(|reason| (key("who"), reason))?;
                if let Who::Group(g) = &parsed
                    && !compiled_groups.contains_key(g)
                {
                    return Err((
                        key("who"),
                        format!("group `{g}` is not defined under access.groups"),
                    ));
                }
                who.push(parsed);
            }
            let repositories = r
                .repositories
                .iter()
                .map(|g| Glob::parse(g))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|reason| (key("repositories"), reason))?;
            compiled.push(Rule {
                who,
                networks: r.networks.clone(),
                repositories,
            });
        }
        Ok(Policy {
            rules: compiled,
            groups: compiled_groups,
        })
    }

    /// Members of the `admins` group may use the admin endpoints.
    pub fn is_admin(&self, id: &Identity) -> bool {
        self.in_group("admins", id)
    }

    fn in_group(&self, group: &str, id: &Identity) -> bool {
        self.groups
            .get(group)
            .is_some_and(|members| members.iter().any(|m| who_is(m, id)))
    }

    fn applies(&self, who: &Who, id: &Identity) -> bool {
        match who {
            Who::Anonymous => matches!(id, Identity::Anonymous),
            Who::Authenticated => !matches!(id, Identity::Anonymous),
            Who::Group(g) => self.in_group(g, id),
            other => who_is(other, id),
        }
    }

    fn rules_for<'a>(&'a self, id: &'a Identity, ip: IpAddr) -> impl Iterator<Item = &'a Rule> {
        self.rules.iter().filter(move |r| {
            r.who.iter().any(|w| self.applies(w, id))
                && (r.networks.is_empty() || r.networks.iter().any(|n| n.contains(&ip)))
        })
    }

    /// Whether `id`, connecting from `ip`, may pull `target` (`upstream/repository`).
    pub fn allows(&self, id: &Identity, ip: IpAddr, target: &str) -> bool {
        self.rules_for(id, ip)
            .any(|r| r.repositories.iter().any(|g| g.matches(target)))
    }

    /// Whether `id` from `ip` may pull anything at all (answers `GET /v2/`).
    pub fn allows_any(&self, id: &Identity, ip: IpAddr) -> bool {
        self.rules_for(id, ip).next().is_some()
    }
}

fn who_is(who: &Who, id: &Identity) -> bool {
    match (who, id) {
        (Who::User(a), Identity::User(b))
        | (Who::Token(a), Identity::Token(b))
        | (Who::Subject(a), Identity::Subject(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> Policy {
        #[derive(Deserialize)]
        struct P {
            #[serde(default)]
            groups: BTreeMap<String, Vec<String>>,
            rules: Vec<RuleConfig>,
        }
        let p: P = serde_saphyr::from_str(yaml).expect("test yaml");
        Policy::compile(&p.rules, &p.groups).expect("valid policy")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn globs_match_within_and_across_components() {
        let g = |p: &str, t: &str| Glob::parse(p).expect("glob").matches(t);
        assert!(g("docker.io/library/*", "docker.io/library/alpine"));
        assert!(!g("docker.io/library/*", "docker.io/library/a/b"));
        assert!(!g("docker.io/library/*", "docker.io/other/alpine"));
        assert!(g("ghcr.io/acme/**", "ghcr.io/acme/team/app"));
        assert!(!g("ghcr.io/acme/**", "ghcr.io/acmecorp/app"));
        assert!(g("ghcr.io/**", "ghcr.io/x/y/z"));
        assert!(g("**", "quay.io/x"));
        assert!(g("docker.io/library/al*", "docker.io/library/alpine"));
        assert!(!g("docker.io/library/al*", "docker.io/library/busybox"));
        assert!(Glob::parse("alpine").is_err());
        assert!(Glob::parse("").is_err());
    }

    #[test]
    fn rules_combine_identity_network_and_repository() {
        let p = policy(
            r#"
groups:
  ci: ["user:bob", "token:runner"]
rules:
  - who: [user:alice]
    repositories: ["docker.io/library/*"]
  - who: [group:ci]
    repositories: ["ghcr.io/acme/**"]
  - who: [anonymous]
    networks: ["10.0.0.0/8"]
    repositories: ["docker.io/library/alpine"]
  - who: ["subject:CN=node-1"]
    repositories: ["**"]
"#,
        );
        let alice = Identity::User("alice".into());
        let bob = Identity::User("bob".into());
        let runner = Identity::Token("runner".into());
        let anon = Identity::Anonymous;
        let any = ip("192.0.2.1");
        assert!(p.allows(&alice, any, "docker.io/library/alpine"));
        assert!(!p.allows(&alice, any, "ghcr.io/acme/app"));
        assert!(p.allows(&bob, any, "ghcr.io/acme/app"));
        assert!(p.allows(&runner, any, "ghcr.io/acme/x/y"));
        assert!(!p.allows(&Identity::User("runner".into()), any, "ghcr.io/acme/app"));
        assert!(!p.allows(&anon, any, "docker.io/library/alpine"));
        assert!(p.allows(&anon, ip("10.1.2.3"), "docker.io/library/alpine"));
        assert!(!p.allows(&anon, ip("10.1.2.3"), "docker.io/library/busybox"));
        assert!(p.allows_any(&anon, ip("10.1.2.3")));
        assert!(!p.allows_any(&anon, any));
        assert!(p.allows(&Identity::Subject("CN=node-1".into()), any, "quay.io/a/b"));
        assert!(!p.allows(&Identity::User("CN=node-1".into()), any, "quay.io/a/b"));
    }

    #[test]
    fn authenticated_means_any_known_identity() {
        let p = policy(
            r#"
rules:
  - who: [authenticated]
    networks: ["192.0.2.0/24", "2001:db8::/32"]
    repositories: ["docker.io/**"]
"#,
        );
        let inside = ip("192.0.2.50");
        for id in [
            Identity::User("u".into()),
            Identity::Token("t".into()),
            Identity::Subject("CN=s".into()),
        ] {
            assert!(p.allows(&id, inside, "docker.io/library/alpine"), "{id}");
            assert!(p.allows(&id, ip("2001:db8::7"), "docker.io/x/y"), "{id}");
            assert!(
                !p.allows(&id, ip("198.51.100.1"), "docker.io/library/alpine"),
                "{id}"
            );
        }
        assert!(!p.allows(&Identity::Anonymous, inside, "docker.io/library/alpine"));
    }

    #[test]
    fn no_rules_deny_everything() {
        let p = Policy::default();
        assert!(!p.allows(
            &Identity::User("root".into()),
            ip("127.0.0.1"),
            "docker.io/library/alpine"
        ));
    }

    #[test]
    fn bad_rules_name_the_key() {
        let groups = BTreeMap::new();
        let rule = |who: &str, repo: &str| RuleConfig {
            who: vec![who.into()],
            networks: vec![],
            repositories: vec![repo.into()],
        };
        let err = Policy::compile(&[rule("alice", "docker.io/**")], &groups).unwrap_err();
        assert_eq!(err.0, "access.rules[0].who");
        let err = Policy::compile(&[rule("group:nope", "docker.io/**")], &groups).unwrap_err();
        assert!(err.1.contains("nope"));
        let err = Policy::compile(&[rule("user:a", "alpine")], &groups).unwrap_err();
        assert_eq!(err.0, "access.rules[0].repositories");
    }
}

//! A Kubernetes Secret volume of type `kubernetes.io/dockerconfigjson`, written and updated the
//! way the kubelet's atomic writer does it: each version in a new timestamped directory,
//! `..data` pointing at the current one and swapped by a single rename, the visible
//! `.dockerconfigjson` a symlink through `..data`, the old version removed afterwards.

use std::path::{Path, PathBuf};

use base64::Engine as _;

pub const KEY: &str = ".dockerconfigjson";

/// The base64 `auth` value of `user:password`, as `kubectl create secret docker-registry`
/// writes it.
pub fn auth(user: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

/// A dockerconfigjson document with one `auth` entry per `(registry key, user, password)`.
pub fn dockerconfigjson(entries: &[(&str, &str, &str)]) -> String {
    let auths: serde_json::Map<String, serde_json::Value> = entries
        .iter()
        .map(|(key, user, password)| {
            (
                (*key).to_owned(),
                serde_json::json!({
                    "username": user,
                    "password": password,
                    "auth": auth(user, password),
                }),
            )
        })
        .collect();
    serde_json::json!({ "auths": auths }).to_string()
}

pub struct SecretVolume {
    dir: PathBuf,
    version: u32,
}

impl SecretVolume {
    /// A mounted Secret at `dir` (created) holding `content` as `.dockerconfigjson`.
    pub fn create(dir: &Path, content: &str) -> SecretVolume {
        std::fs::create_dir_all(dir).expect("creating the secret volume");
        let mut volume = SecretVolume {
            dir: dir.to_owned(),
            version: 0,
        };
        volume.update(content);
        std::os::unix::fs::symlink(format!("..data/{KEY}"), dir.join(KEY))
            .expect("linking the secret's key through ..data");
        volume
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Replaces the content atomically, as the kubelet does when the Secret is updated.
    pub fn update(&mut self, content: &str) {
        self.version += 1;
        let stamp = format!("..2026_11_24_14_00_00.{:09}", self.version);
        let version_dir = self.dir.join(&stamp);
        std::fs::create_dir(&version_dir).expect("creating the new version's directory");
        std::fs::write(version_dir.join(KEY), content).expect("writing the new version");
        let old = std::fs::read_link(self.dir.join("..data")).ok();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&stamp, &tmp).expect("linking ..data_tmp");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("swapping ..data");
        if let Some(old) = old {
            std::fs::remove_dir_all(self.dir.join(old)).expect("removing the old version");
        }
    }
}

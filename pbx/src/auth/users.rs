//! The accounts digest authentication checks against: `auth.users` of the
//! config plus `auth.users_file` (a YAML list of the same shape, usually a
//! mounted Kubernetes Secret), with each user's HA1 per algorithm computed
//! once. The file is polled and re-read when it changes; a file that does
//! not parse keeps the accounts loaded before.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::digest::Algorithm;
use crate::config::UserConfig;

/// How often `users_file` is checked for changes.
const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// HA1 values of one account; an account given only one precomputed HA1
/// can answer only that algorithm's challenge.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Account {
    pub ha1_md5: Option<String>,
    pub ha1_sha256: Option<String>,
}

impl Account {
    pub fn ha1(&self, algorithm: Algorithm) -> Option<&str> {
        match algorithm {
            Algorithm::Md5 => self.ha1_md5.as_deref(),
            Algorithm::Sha256 => self.ha1_sha256.as_deref(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("auth.users_file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("auth.users_file {path}: {source}")]
    Syntax {
        path: PathBuf,
        source: serde_yaml::Error,
    },
}

/// The accounts, shared by the authenticator and the registrar (which
/// tells a known user without bindings, 480, from an unknown one, 404).
#[derive(Debug, Clone, Default)]
pub struct Directory {
    accounts: Arc<RwLock<HashMap<String, Account>>>,
}

impl Directory {
    /// The accounts of `users` (config) and `file` (if any).
    pub fn load(
        realm: &str,
        users: &[UserConfig],
        file: Option<&Path>,
    ) -> Result<Directory, UsersError> {
        let directory = Directory::default();
        directory.replace(realm, users, file)?;
        Ok(directory)
    }

    fn replace(
        &self,
        realm: &str,
        users: &[UserConfig],
        file: Option<&Path>,
    ) -> Result<usize, UsersError> {
        let mut all = accounts(realm, users);
        if let Some(path) = file {
            all.extend(accounts(realm, &read_file(path)?));
        }
        let count = all.len();
        if let Ok(mut accounts) = self.accounts.write() {
            *accounts = all;
        }
        Ok(count)
    }

    pub fn get(&self, username: &str) -> Option<Account> {
        self.accounts.read().ok()?.get(username).cloned()
    }

    pub fn contains(&self, username: &str) -> bool {
        self.accounts
            .read()
            .is_ok_and(|accounts| accounts.contains_key(username))
    }

    /// Re-reads `file` whenever its contents change, for as long as the
    /// runtime runs.
    pub fn watch(&self, realm: String, users: Vec<UserConfig>, file: PathBuf) {
        let directory = self.clone();
        tokio::spawn(async move {
            let mut last = tokio::fs::read(&file).await.ok();
            let mut tick = tokio::time::interval(RELOAD_INTERVAL);
            loop {
                tick.tick().await;
                let now = tokio::fs::read(&file).await.ok();
                if now.is_none() || now == last {
                    continue;
                }
                last = now;
                match directory.replace(&realm, &users, Some(&file)) {
                    Ok(count) => {
                        tracing::info!(path = %file.display(), accounts = count, "users file reloaded")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "users file not reloaded; keeping the accounts loaded before")
                    }
                }
            }
        });
    }
}

fn read_file(path: &Path) -> Result<Vec<UserConfig>, UsersError> {
    let text = std::fs::read_to_string(path).map_err(|source| UsersError::Read {
        path: path.to_owned(),
        source,
    })?;
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_yaml::from_str(&text).map_err(|source| UsersError::Syntax {
        path: path.to_owned(),
        source,
    })
}

fn accounts(realm: &str, users: &[UserConfig]) -> HashMap<String, Account> {
    users
        .iter()
        .filter(|u| !u.username.is_empty())
        .map(|u| {
            let account = match &u.password {
                Some(password) => Account {
                    ha1_md5: Some(Algorithm::Md5.ha1(&u.username, realm, password)),
                    ha1_sha256: Some(Algorithm::Sha256.ha1(&u.username, realm, password)),
                },
                None => Account {
                    ha1_md5: u.ha1.as_ref().map(|h| h.to_ascii_lowercase()),
                    ha1_sha256: u.ha1_sha256.as_ref().map(|h| h.to_ascii_lowercase()),
                },
            };
            (u.username.clone(), account)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, password: &str) -> UserConfig {
        UserConfig {
            username: name.into(),
            password: Some(password.into()),
            ..UserConfig::default()
        }
    }

    #[test]
    fn passwords_become_ha1_per_algorithm_and_the_file_adds_users() {
        let dir = crate::test_support::TempDir::new("users");
        let file = dir.path().join("users.yaml");
        std::fs::write(&file, "- username: \"2001\"\n  ha1: \"ABC\"\n").expect("write");
        let d = Directory::load("pbx.local", &[user("1001", "pw")], Some(&file)).expect("loads");
        let a = d.get("1001").expect("config user");
        assert_eq!(
            a.ha1(Algorithm::Md5),
            Some(Algorithm::Md5.ha1("1001", "pbx.local", "pw").as_str())
        );
        assert!(a.ha1(Algorithm::Sha256).is_some());
        let b = d.get("2001").expect("file user");
        assert_eq!(b.ha1(Algorithm::Md5), Some("abc"));
        assert_eq!(b.ha1(Algorithm::Sha256), None);
        std::fs::write(&file, "not: [a list").expect("write");
        assert!(d.replace("pbx.local", &[], Some(&file)).is_err());
        assert!(d.contains("2001"), "a bad file keeps the old accounts");
    }
}

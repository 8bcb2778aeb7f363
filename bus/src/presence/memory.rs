//! Presence in the process's own memory (standalone: the gateway's presence thread writes it,
//! logic reads it in the same process). Entries live as long as their connection; there is
//! no other gateway whose entries could go stale, so nothing expires and refreshes are no-ops.

use super::{Change, Connection, Presence};
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

#[derive(Default)]
pub struct MemoryPresence {
    users: Mutex<HashMap<u64, Vec<Entry>>>,
}

struct Entry {
    gateway: Arc<str>,
    conn: u64,
    jti: Box<str>,
    device: Option<Box<str>>,
}

impl MemoryPresence {
    fn users(&self) -> MutexGuard<'_, HashMap<u64, Vec<Entry>>> {
        self.users.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies one change from gateway `gateway_id`'s shards; the user's connections after
    /// it (0 for a refresh).
    pub fn apply_one(&self, gateway_id: &str, change: &Change) -> u32 {
        let mut users = self.users();
        match change {
            Change::Online {
                user,
                conn,
                jti,
                device,
            } => {
                let entries = users.entry(*user).or_default();
                entries.retain(|e| !(e.conn == *conn && &*e.gateway == gateway_id));
                entries.push(Entry {
                    gateway: gateway_id.into(),
                    conn: *conn,
                    jti: jti.clone(),
                    device: device.clone(),
                });
                entries.len() as u32
            }
            Change::Offline { user, conn } => {
                let Some(entries) = users.get_mut(user) else {
                    return 0;
                };
                entries.retain(|e| !(e.conn == *conn && &*e.gateway == gateway_id));
                let left = entries.len() as u32;
                if left == 0 {
                    users.remove(user);
                }
                left
            }
            Change::Refresh(_) => 0,
        }
    }
}

#[async_trait]
impl Presence for MemoryPresence {
    async fn apply(&self, gateway_id: &str, changes: &[Change]) -> Result<Vec<u32>, String> {
        Ok(changes
            .iter()
            .map(|c| self.apply_one(gateway_id, c))
            .collect())
    }

    async fn gateways(&self, users: &[u64]) -> Result<HashMap<u64, Vec<String>>, String> {
        let table = self.users();
        let mut out = HashMap::new();
        for u in users {
            if let Some(entries) = table.get(u) {
                let mut gws: Vec<String> = entries.iter().map(|e| e.gateway.to_string()).collect();
                gws.sort_unstable();
                gws.dedup();
                out.insert(*u, gws);
            }
        }
        Ok(out)
    }

    async fn connections(&self, user: u64) -> Result<Vec<Connection>, String> {
        Ok(self
            .users()
            .get(&user)
            .map(|es| {
                es.iter()
                    .map(|e| Connection {
                        gateway: e.gateway.to_string(),
                        conn: e.conn,
                        jti: e.jti.to_string(),
                        device: e.device.as_deref().unwrap_or("").to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn online(user: u64, conn: u64, jti: &str) -> Change {
        Change::Online {
            user,
            conn,
            jti: jti.into(),
            device: None,
        }
    }

    #[tokio::test]
    async fn memory_presence_follows_connections() {
        let p = MemoryPresence::default();
        let counts = p
            .apply("gw-a", &[online(1, 10, "t1"), online(1, 11, "t2")])
            .await
            .unwrap();
        assert_eq!(counts, [1, 2], "the first connection, then a second device");
        assert_eq!(p.apply("gw-b", &[online(1, 10, "t3")]).await.unwrap(), [3]);
        let counts = p
            .apply("gw-a", &[online(2, 12, "t4"), Change::Refresh(vec![1, 2])])
            .await
            .unwrap();
        assert_eq!(counts, [1, 0]);
        let g = p.gateways(&[1, 2, 3]).await.unwrap();
        assert_eq!(g[&1], vec!["gw-a", "gw-b"]);
        assert_eq!(g[&2], vec!["gw-a"]);
        assert!(!g.contains_key(&3));
        let mut c = p.connections(1).await.unwrap();
        c.sort();
        let conn = |gateway: &str, conn, jti: &str| Connection {
            gateway: gateway.into(),
            conn,
            jti: jti.into(),
            device: String::new(),
        };
        assert_eq!(
            c,
            vec![
                conn("gw-a", 10, "t1"),
                conn("gw-a", 11, "t2"),
                conn("gw-b", 10, "t3")
            ]
        );
        let last = [Change::Offline { user: 2, conn: 12 }];
        assert_eq!(
            p.apply("gw-a", &last).await.unwrap(),
            [0],
            "user 2's last connection closed"
        );
        let left = [Change::Offline { user: 1, conn: 10 }];
        assert_eq!(p.apply("gw-b", &left).await.unwrap(), [2]);
        assert!(p.gateways(&[2]).await.unwrap().is_empty());
        assert_eq!(p.gateways(&[1]).await.unwrap()[&1], vec!["gw-a"]);
        assert_eq!(p.connections(1).await.unwrap().len(), 2);
    }
}

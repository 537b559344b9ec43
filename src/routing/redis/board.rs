//! The cluster-wide backend board (see [`crate::routing::board`]) in Redis.
//!
//! Keys, all under one hash tag so that a script may touch several of them in Redis Cluster
//! (a script's keys must share a slot): `{prefix}{backends}:replicas` (sorted set: replica ->
//! expiry, unix ms by the server's clock), `{prefix}{backends}:load:{replica}` (hash
//! `pool/backend` -> live sessions, expiring with the replica's entry), `{prefix}{backends}:drained`
//! (set of `pool/backend`), `{prefix}{backends}:registry` (hash `pool/backend` -> `host:port`).
//! The board is a few hundred bytes per replica and one round trip per replica per second, so
//! one slot holding it all is no hot spot.
//!
//! Expiry runs on the server's clock (`TIME` inside the scripts), so replicas with skewed clocks
//! still agree on which counts are live.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::LazyLock;

use async_trait::async_trait;

use super::RedisStore;
use crate::routing::board::{BackendBoard, BackendKey, BoardView, LOAD_TTL};
use crate::routing::store::StoreError;

/// Replace this replica's counts, renew its entry, prune expired replicas, and return the
/// cluster-wide view: live replicas, summed counts, drain marks, registry.
static SYNC: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('DEL', KEYS[2])
for i = 4, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local live = redis.call('ZRANGE', KEYS[1], 0, -1)
local totals = {}
for _, replica in ipairs(live) do
  local kv = redis.call('HGETALL', ARGV[3] .. replica)
  for i = 1, #kv, 2 do
    totals[kv[i]] = (totals[kv[i]] or 0) + tonumber(kv[i + 1])
  end
end
local flat = {}
for k, v in pairs(totals) do
  flat[#flat + 1] = k
  flat[#flat + 1] = tostring(v)
end
return {#live, flat, redis.call('SMEMBERS', KEYS[3]), redis.call('HGETALL', KEYS[4])}
"#,
    )
});

/// Least loaded of the candidates (ARGV[5..], in order of preference among equals) over every
/// live replica's counts, counted at once as one more session of this replica's.
static PLACE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local fields = {}
for i = 5, #ARGV do
  fields[#fields + 1] = ARGV[4] .. '/' .. ARGV[i]
end
if #fields == 0 then
  return false
end
local loads = {}
for i = 1, #fields do
  loads[i] = 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
for _, replica in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  local counts = redis.call('HMGET', ARGV[3] .. replica, unpack(fields))
  for i = 1, #fields do
    if counts[i] then
      loads[i] = loads[i] + tonumber(counts[i])
    end
  end
end
local best = 1
for i = 2, #fields do
  if loads[i] < loads[best] then
    best = i
  end
end
redis.call('HINCRBY', KEYS[2], fields[best], 1)
redis.call('PEXPIRE', KEYS[2], ttl)
return ARGV[4 + best]
"#,
    )
});

/// Move one count of this replica's; a count that reaches zero is removed. The replica's entry
/// is renewed too: a replica that has not synced yet (it just started) counts at once.
static ADD: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
if n <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[4])
return n
"#,
    )
});

fn field(key: &BackendKey) -> String {
    format!("{}/{}", key.pool, key.name)
}

/// `pool/backend` back to a key; pool and backend names never contain `/` (config and admin
/// API both check them), so the first `/` splits them.
fn parse_field(field: &str) -> Option<BackendKey> {
    let (pool, name) = field.split_once('/')?;
    Some(BackendKey::new(pool, name))
}

fn ttl_ms() -> u64 {
    LOAD_TTL.as_millis() as u64
}

impl RedisStore {
    fn board_key(&self, what: &str) -> String {
        format!("{}{{backends}}:{what}", self.prefix)
    }

    fn load_key(&self, replica: &str) -> String {
        self.board_key(&format!("load:{replica}"))
    }
}

#[async_trait]
impl BackendBoard for RedisStore {
    async fn sync(
        &self,
        replica: &str,
        counts: &[(BackendKey, usize)],
    ) -> Result<BoardView, StoreError> {
        let keys = [
            self.board_key("replicas"),
            self.load_key(replica),
            self.board_key("drained"),
            self.board_key("registry"),
        ];
        let load_prefix = self.board_key("load:");
        let counts: Vec<(String, usize)> = counts
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| (field(k), *n))
            .collect();
        type Answer = (usize, Vec<String>, Vec<String>, Vec<String>);
        let (replicas, sessions, drained, registry): Answer = self
            .op("board_sync", |mut c| async move {
                let mut call = SYNC.prepare_invoke();
                for key in &keys {
                    call.key(key);
                }
                call.arg(replica).arg(ttl_ms()).arg(&load_prefix);
                for (field, n) in &counts {
                    call.arg(field).arg(*n);
                }
                call.invoke_async(&mut c).await
            })
            .await?;
        let pairs = |flat: Vec<String>| -> Vec<(String, String)> {
            let mut it = flat.into_iter();
            let mut out = Vec::new();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                out.push((k, v));
            }
            out
        };
        let sessions: HashMap<BackendKey, usize> = pairs(sessions)
            .into_iter()
            .filter_map(|(k, v)| Some((parse_field(&k)?, v.parse().ok()?)))
            .collect();
        let drained: HashSet<BackendKey> = drained.iter().filter_map(|f| parse_field(f)).collect();
        let registered: BTreeMap<BackendKey, String> = pairs(registry)
            .into_iter()
            .filter_map(|(k, v)| Some((parse_field(&k)?, v)))
            .collect();
        Ok(BoardView {
            sessions,
            replicas,
            drained,
            registered,
        })
    }

    async fn place(
        &self,
        replica: &str,
        pool: &str,
        candidates: &[String],
    ) -> Result<Option<String>, StoreError> {
        let keys = [self.board_key("replicas"), self.load_key(replica)];
        let load_prefix = self.board_key("load:");
        self.op("board_place", |mut c| async move {
            let mut call = PLACE.prepare_invoke();
            call.key(&keys[0]).key(&keys[1]);
            call.arg(replica).arg(ttl_ms()).arg(&load_prefix).arg(pool);
            for name in candidates {
                call.arg(name);
            }
            call.invoke_async(&mut c).await
        })
        .await
    }

    async fn add_sessions(
        &self,
        replica: &str,
        key: &BackendKey,
        delta: i64,
    ) -> Result<(), StoreError> {
        let (load, replicas) = (self.load_key(replica), self.board_key("replicas"));
        let field = field(key);
        self.op("board_count", |mut c| async move {
            ADD.key(&load)
                .key(&replicas)
                .arg(&field)
                .arg(delta)
                .arg(ttl_ms())
                .arg(replica)
                .invoke_async::<i64>(&mut c)
                .await
                .map(|_| ())
        })
        .await
    }

    async fn leave(&self, replica: &str) -> Result<(), StoreError> {
        let (replicas, load) = (self.board_key("replicas"), self.load_key(replica));
        self.op("board_leave", |mut c| async move {
            redis::pipe()
                .atomic()
                .del(&load)
                .ignore()
                .zrem(&replicas, replica)
                .ignore()
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    async fn set_drain(&self, key: &BackendKey, draining: bool) -> Result<(), StoreError> {
        let set = self.board_key("drained");
        let member = field(key);
        self.op("board_drain", |mut c| async move {
            let mut cmd = redis::cmd(if draining { "SADD" } else { "SREM" });
            cmd.arg(&set).arg(&member);
            cmd.query_async::<i64>(&mut c).await.map(|_| ())
        })
        .await
    }

    async fn register(&self, key: &BackendKey, addr: &str) -> Result<(), StoreError> {
        let registry = self.board_key("registry");
        let member = field(key);
        self.op("board_register", |mut c| async move {
            redis::cmd("HSET")
                .arg(&registry)
                .arg(&member)
                .arg(addr)
                .query_async::<i64>(&mut c)
                .await
                .map(|_| ())
        })
        .await
    }

    async fn deregister(&self, key: &BackendKey) -> Result<bool, StoreError> {
        let registry = self.board_key("registry");
        let member = field(key);
        self.op("board_register", |mut c| async move {
            redis::cmd("HDEL")
                .arg(&registry)
                .arg(&member)
                .query_async::<i64>(&mut c)
                .await
                .map(|n| n > 0)
        })
        .await
    }

    async fn registered(&self, key: &BackendKey) -> Result<Option<String>, StoreError> {
        let registry = self.board_key("registry");
        let member = field(key);
        self.op("board_lookup", |mut c| async move {
            redis::cmd("HGET")
                .arg(&registry)
                .arg(&member)
                .query_async::<Option<String>>(&mut c)
                .await
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip() {
        let key = BackendKey::new("sandboxes", "agent-7");
        assert_eq!(parse_field(&field(&key)), Some(key));
        assert_eq!(parse_field("no-slash"), None);
    }
}

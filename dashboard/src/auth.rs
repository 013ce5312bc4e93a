//! Security primitives of the dashboard (SPEC §9 "Security"): password hashes and the memory
//! bound of checking them, roles, API tokens, random secrets, client addresses behind trusted
//! proxies, login rate limiting and masking of payload fields for viewers.
//!
//! Nothing here touches a database or HTTP. Config loading calls the `check_*` functions
//! and [`Tokens::new`]; the login and API layers call the rest.

use std::collections::{HashMap, VecDeque};
use std::fmt::{self, Write as _};
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Argon2, Params, PasswordHash};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use subtle::{Choice, ConditionallySelectable as _, ConstantTimeEq as _};

/// Largest accepted argon2 memory cost, in KiB (1 GiB). A typo in a configured hash must not
/// make every login allocate unbounded memory.
const MAX_M_COST_KIB: u32 = 1024 * 1024;

/// Largest accepted argon2 time cost (passes over memory).
const MAX_T_COST: u32 = 64;

/// Number of random bytes in a secret from [`new_secret`].
const SECRET_BYTES: usize = 32;

/// Failed logins allowed per client address within the window, over all names.
pub const ADDRESS_MAX_FAILURES: u32 = 30;

/// Failed logins allowed per key within the window, by default.
pub const DEFAULT_MAX_FAILURES: u32 = 5;

/// Window in which failed logins are counted, by default.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(15 * 60);

/// Keys the login limiter tracks at most, by default.
pub const DEFAULT_MAX_KEYS: usize = 10_000;

/// What a masked value is replaced by.
pub const MASK: &str = "***";

/// Errors of the security primitives.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Hashing a password failed (RNG or argon2 error).
    #[error("hashing the password failed")]
    Hash(#[source] argon2::password_hash::Error),
    /// A role name is not `viewer`, `operator` or `admin`.
    #[error("unknown role {0:?}: expected viewer, operator or admin")]
    UnknownRole(String),
    /// An API token's `sha256` is not 64 hex characters.
    #[error("api token {name:?}: sha256 must be 64 hex characters")]
    TokenDigest {
        /// The token entry's name.
        name: String,
    },
    /// Two API token entries share a name or a digest.
    #[error("api token {name:?}: {what} is already used by another api token")]
    DuplicateToken {
        /// The later entry's name.
        name: String,
        /// `"name"` or `"sha256"`.
        what: &'static str,
    },
}

// ---------------------------------------------------------------------------------------------
// Passwords

/// Hashes a password with Argon2id (argon2 crate defaults) and a random salt, as a PHC string.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|hash| hash.to_string())
        .map_err(AuthError::Hash)
}

/// Checks a password against a PHC hash. False on a mismatch and on a malformed hash.
pub fn verify_password(phc: &str, password: &str) -> bool {
    let Ok(hash) = parse_hash(phc) else {
        return false;
    };
    // The parameters come from the hash itself, not from this default instance.
    Argon2::default()
        .verify_password(password.as_bytes(), &hash)
        .is_ok()
}

/// The memory an argon2 check of `phc` allocates, in KiB (0 for a malformed hash, which is never
/// checked).
pub fn memory_cost_kib(phc: &str) -> u32 {
    parse_hash(phc)
        .ok()
        .and_then(|hash| Params::try_from(&hash).ok())
        .map_or(0, |params| params.m_cost())
}

/// A bound on the memory that password checks take at once. Each argon2 check allocates its memory
/// cost (19 MiB with the defaults) for as long as it runs; without a bound, a flood of logins with
/// made-up names holds as many of those at once as it sends, and the process's memory stays grown.
/// A check waits a short while for room, then is refused (the caller answers 429).
pub struct PasswordChecks {
    budget_kib: u32,
    room: std::sync::Arc<tokio::sync::Semaphore>,
}

impl PasswordChecks {
    /// Checks that take at most `budget_kib` KiB at once (at least one check always fits: a hash
    /// costlier than the whole budget runs alone).
    pub fn new(budget_kib: u32) -> Self {
        let budget_kib = budget_kib.max(1);
        Self {
            budget_kib,
            room: std::sync::Arc::new(tokio::sync::Semaphore::new(budget_kib as usize)),
        }
    }

    /// Whether `password` matches `phc`, checked on the blocking pool once its memory fits; `None`
    /// when there was no room within `wait`. The room is given back when the check ends, even if
    /// the caller has gone.
    pub async fn verify(&self, phc: String, password: String, wait: Duration) -> Option<bool> {
        let cost = memory_cost_kib(&phc).clamp(1, self.budget_kib);
        let permit = tokio::time::timeout(wait, self.room.clone().acquire_many_owned(cost))
            .await
            .ok()?
            .ok()?;
        tokio::task::spawn_blocking(move || {
            let matches = verify_password(&phc, &password);
            drop(permit);
            matches
        })
        .await
        .ok()
    }
}

impl fmt::Debug for PasswordChecks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasswordChecks")
            .field("budget_kib", &self.budget_kib)
            .field("free_kib", &self.room.available_permits())
            .finish()
    }
}

/// Validates a configured password hash: an argon2 PHC string with salt, output and sane costs.
///
/// The message says what is wrong and never repeats the salt or the hash.
pub fn check_hash(phc: &str) -> Result<(), String> {
    parse_hash(phc).map(drop)
}

/// Parses and validates a PHC string; the single gate before any argon2 work.
fn parse_hash(phc: &str) -> Result<PasswordHash, String> {
    if phc.is_empty() {
        return Err("password hash is empty (generate one with `mend hash-password`)".to_owned());
    }
    let hash = PasswordHash::new(phc).map_err(|e| {
        format!(
            "password hash is not a PHC string like `$argon2id$v=19$m=…,t=…,p=…$<salt>$<hash>`: {e}"
        )
    })?;
    let algorithm = hash.algorithm.as_str();
    if argon2::Algorithm::from_str(algorithm).is_err() {
        return Err(format!(
            "password hash uses `{algorithm}`, expected argon2id (or argon2i, argon2d)"
        ));
    }
    if let Some(version) = hash.version
        && argon2::Version::try_from(version).is_err()
    {
        return Err(format!(
            "password hash has unsupported argon2 version {version}"
        ));
    }
    if hash.salt.is_none() {
        return Err("password hash has no salt".to_owned());
    }
    if hash.hash.is_none() {
        return Err("password hash has no hash output".to_owned());
    }
    let params = Params::try_from(&hash).map_err(|e| format!("password hash parameters: {e}"))?;
    if params.m_cost() > MAX_M_COST_KIB {
        return Err(format!(
            "password hash memory cost m={} KiB is above the limit of {MAX_M_COST_KIB} KiB",
            params.m_cost()
        ));
    }
    if params.t_cost() > MAX_T_COST {
        return Err(format!(
            "password hash time cost t={} is above the limit of {MAX_T_COST}",
            params.t_cost()
        ));
    }
    Ok(hash)
}

// ---------------------------------------------------------------------------------------------
// Roles

/// What a user or token may do. Ordered: each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything, with configured payload fields masked.
    Viewer,
    /// A viewer who may also resubmit, discard and release holds.
    Operator,
    /// Everything.
    Admin,
}

impl Role {
    /// The role's config name: `viewer`, `operator` or `admin`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }

    /// Whether this role may do what `needed` may do (admin ⊇ operator ⊇ viewer).
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = AuthError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "viewer" => Ok(Self::Viewer),
            "operator" => Ok(Self::Operator),
            "admin" => Ok(Self::Admin),
            other => Err(AuthError::UnknownRole(other.to_owned())),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// API tokens

/// The lowercase hex SHA-256 of a token, as configured in `[[api_token]] sha256`.
pub fn token_digest(token: &str) -> String {
    let mut hex = String::with_capacity(64);
    for byte in Sha256::digest(token.as_bytes()) {
        // Writing to a String cannot fail.
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// The configured API tokens, kept as SHA-256 digests only.
#[derive(Clone, Default)]
pub struct Tokens {
    entries: Vec<TokenEntry>,
}

#[derive(Clone)]
struct TokenEntry {
    name: String,
    role: Role,
    digest: [u8; 32],
}

impl Tokens {
    /// Builds the token set from `(name, role, sha256 hex)` entries.
    ///
    /// Fails, naming the entry, on a digest that is not 64 hex characters (any case) or on a
    /// name or digest used twice.
    pub fn new<I, N, D>(entries: I) -> Result<Self, AuthError>
    where
        I: IntoIterator<Item = (N, Role, D)>,
        N: Into<String>,
        D: AsRef<str>,
    {
        let mut tokens = Self::default();
        for (name, role, hex) in entries {
            let name = name.into();
            let Some(digest) = decode_hex32(hex.as_ref()) else {
                return Err(AuthError::TokenDigest { name });
            };
            let duplicate = tokens.entries.iter().find_map(|e| {
                if e.name == name {
                    Some("name")
                } else if e.digest == digest {
                    Some("sha256")
                } else {
                    None
                }
            });
            if let Some(what) = duplicate {
                return Err(AuthError::DuplicateToken { name, what });
            }
            tokens.entries.push(TokenEntry { name, role, digest });
        }
        Ok(tokens)
    }

    /// Whether no token is configured.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Finds the entry for a presented bearer token: its name and role.
    ///
    /// Every entry is compared in constant time, so the time taken does not tell which one
    /// matched.
    pub fn check(&self, presented: &str) -> Option<(&str, Role)> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = Choice::from(0);
        let mut index = 0u64;
        for (i, entry) in self.entries.iter().enumerate() {
            let equal = entry.digest[..].ct_eq(&digest[..]);
            index.conditional_assign(&(i as u64), equal);
            found |= equal;
        }
        if !bool::from(found) {
            return None;
        }
        let entry = self.entries.get(usize::try_from(index).ok()?)?;
        Some((entry.name.as_str(), entry.role))
    }
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names and roles only; the digests stay out of logs.
        f.debug_map()
            .entries(self.entries.iter().map(|e| (&e.name, e.role)))
            .finish()
    }
}

/// Decodes exactly 64 hex characters (any case) into 32 bytes.
fn decode_hex32(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        let [hi, lo] = pair else {
            return None;
        };
        *byte = (hex_value(*hi)? << 4) | hex_value(*lo)?;
    }
    Some(out)
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Random secrets

/// A new random secret (session id, CSRF token): 32 bytes from the OS RNG, base64url, no padding.
///
/// # Panics
///
/// If the operating system's RNG fails. A guessable session id must never be issued, and a host
/// without a working RNG cannot run the dashboard safely; the panic ends only the request.
pub fn new_secret() -> String {
    let mut bytes = [0u8; SECRET_BYTES];
    if let Err(error) = getrandom::fill(&mut bytes) {
        panic!("the OS random number generator failed: {error}");
    }
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Compares two secrets in constant time.
///
/// Both sides are hashed first, so neither the content nor the length leaks through timing.
pub fn secrets_equal(a: &str, b: &str) -> bool {
    let a = Sha256::digest(a.as_bytes());
    let b = Sha256::digest(b.as_bytes());
    a[..].ct_eq(&b[..]).into()
}

// ---------------------------------------------------------------------------------------------
// Client addresses behind proxies

/// The proxies (an ingress, a load balancer) whose `X-Forwarded-For` is believed. Behind one, every
/// client reaches the dashboard from the proxy's address, so limits keyed by address would be
/// shared by everyone (five wrong passwords from anyone would lock a user out for all); from any
/// other peer the header is ignored, so a client cannot pick its own address.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<ipnet::IpNet>);

impl TrustedProxies {
    /// From addresses (`10.0.0.7`) and networks (`10.0.0.0/8`, `fd00::/8`).
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        entries
            .iter()
            .map(|e| {
                e.parse::<ipnet::IpNet>()
                    .or_else(|_| e.parse::<IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| format!("`{e}` is not an IP address or network (CIDR)"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    /// Whether `ip` is one of the trusted proxies.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client's address: the peer's, unless the peer is a trusted proxy; then the rightmost
    /// address of `X-Forwarded-For` (its header values, in order) that is not a trusted proxy (each
    /// proxy appends the address it was reached from, so entries to the left of that one are the
    /// client's own say). Falls back to the peer when the header is missing or unreadable there.
    pub fn client_ip<'a>(
        &self,
        peer: IpAddr,
        forwarded_for: impl IntoIterator<Item = &'a str>,
    ) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        let hops: Vec<&str> = forwarded_for
            .into_iter()
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        for hop in hops.iter().rev() {
            match hop.parse::<IpAddr>() {
                Ok(ip) if self.trusts(ip) => continue,
                Ok(ip) => return ip,
                Err(_) => return peer,
            }
        }
        peer
    }
}

// ---------------------------------------------------------------------------------------------
// Login rate limiting

/// Counts failed logins per key (e.g. `"{ip}|{username}"`) and refuses a key that had
/// `max_failures` failures within the last `window`.
///
/// Memory is bounded: at most `max_keys` keys are tracked, stored as SHA-256 digests so long
/// user names cost nothing extra. When full, expired keys are dropped first, then the key whose
/// last failure is oldest. Time is passed in, so tests are deterministic.
pub struct LoginLimiter {
    max_failures: usize,
    window: Duration,
    max_keys: usize,
    /// Failure times per key, oldest first, at most `max_failures` of them. A std `Mutex`: it is
    /// held only for a short, non-async update.
    failures: Mutex<HashMap<[u8; 32], VecDeque<Instant>>>,
}

impl LoginLimiter {
    /// A limiter allowing `max_failures` (at least 1) failed logins per key within `window`,
    /// tracking at most `max_keys` (at least 1) keys.
    pub fn new(max_failures: u32, window: Duration, max_keys: usize) -> Self {
        Self {
            max_failures: usize::try_from(max_failures.max(1)).unwrap_or(usize::MAX),
            window,
            max_keys: max_keys.max(1),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `key` may try to log in now; if not, how long until it may.
    pub fn check(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let id = key_id(key);
        let mut map = self.lock();
        let Some(times) = map.get_mut(&id) else {
            return Ok(());
        };
        prune(times, now, self.window);
        if times.is_empty() {
            map.remove(&id);
            return Ok(());
        }
        match times.front() {
            Some(&oldest) if times.len() >= self.max_failures => Err(self
                .window
                .saturating_sub(now.saturating_duration_since(oldest))),
            _ => Ok(()),
        }
    }

    /// Records a failed login for `key`.
    pub fn failed(&self, key: &str, now: Instant) {
        let id = key_id(key);
        let mut map = self.lock();
        if !map.contains_key(&id) && map.len() >= self.max_keys {
            self.make_room(&mut map, now);
        }
        let times = map.entry(id).or_default();
        prune(times, now, self.window);
        times.push_back(now);
        while times.len() > self.max_failures {
            times.pop_front();
        }
    }

    /// Forgets the failures of `key` after a successful login.
    pub fn succeeded(&self, key: &str) {
        self.lock().remove(&key_id(key));
    }

    /// Drops expired keys, then, if still full, the key with the oldest last failure.
    fn make_room(&self, map: &mut HashMap<[u8; 32], VecDeque<Instant>>, now: Instant) {
        map.retain(|_, times| {
            prune(times, now, self.window);
            !times.is_empty()
        });
        if map.len() < self.max_keys {
            return;
        }
        let oldest = map
            .iter()
            .min_by_key(|(_, times)| times.back().copied())
            .map(|(id, _)| *id);
        if let Some(id) = oldest {
            map.remove(&id);
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<[u8; 32], VecDeque<Instant>>> {
        // The map holds plain counters that are valid after any panic, so poison is ignored.
        self.failures.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for LoginLimiter {
    /// [`DEFAULT_MAX_FAILURES`] within [`DEFAULT_WINDOW`], at most [`DEFAULT_MAX_KEYS`] keys.
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FAILURES, DEFAULT_WINDOW, DEFAULT_MAX_KEYS)
    }
}

impl fmt::Debug for LoginLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginLimiter")
            .field("max_failures", &self.max_failures)
            .field("window", &self.window)
            .field("max_keys", &self.max_keys)
            .finish_non_exhaustive()
    }
}

fn key_id(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Drops failures that are `window` old or older.
fn prune(times: &mut VecDeque<Instant>, now: Instant, window: Duration) {
    while let Some(&first) = times.front()
        && now.saturating_duration_since(first) >= window
    {
        times.pop_front();
    }
}

// ---------------------------------------------------------------------------------------------
// Masking

/// Replaces the value at each JSON Pointer (RFC 6901) by `"***"`.
///
/// A `*` segment matches every key of an object or every element of an array. Absent paths
/// and invalid pointers are ignored.
pub fn mask(value: &mut serde_json::Value, pointers: &[String]) {
    for pointer in pointers {
        if let Ok(segments) = parse_pointer(pointer) {
            mask_at(value, &segments);
        }
    }
}

/// Validates a configured mask pointer: empty (the whole payload) or starting with `/`, and
/// `~` only in the escapes `~0` and `~1`.
pub fn check_pointer(p: &str) -> Result<(), String> {
    parse_pointer(p).map(drop)
}

/// Splits a pointer into unescaped segments.
fn parse_pointer(pointer: &str) -> Result<Vec<String>, String> {
    if pointer.is_empty() {
        return Ok(Vec::new());
    }
    let Some(rest) = pointer.strip_prefix('/') else {
        return Err("a JSON pointer must be empty or start with `/`".to_owned());
    };
    rest.split('/').map(unescape_segment).collect()
}

fn unescape_segment(segment: &str) -> Result<String, String> {
    let mut out = String::with_capacity(segment.len());
    let mut chars = segment.chars();
    while let Some(c) = chars.next() {
        if c != '~' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('0') => out.push('~'),
            Some('1') => out.push('/'),
            _ => {
                return Err(
                    "a JSON pointer may use `~` only as `~0` (for `~`) or `~1` (for `/`)"
                        .to_owned(),
                );
            }
        }
    }
    Ok(out)
}

/// Recurses along the pointer, not along the document, so depth is bounded by the pointer.
/// The values `pointers` hide in `payload` (each text or number under a masked place, at least
/// [`MIN_REDACTED`] characters long), for [`redact`].
pub fn masked_values(payload: &serde_json::Value, pointers: &[String]) -> Vec<String> {
    if pointers.is_empty() {
        return Vec::new();
    }
    fn leaves(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::String(s) => out.push(s.clone()),
            serde_json::Value::Number(n) => out.push(n.to_string()),
            serde_json::Value::Array(items) => items.iter().for_each(|i| leaves(i, out)),
            serde_json::Value::Object(map) => map.values().for_each(|i| leaves(i, out)),
            _ => {}
        }
    }
    fn hidden(orig: &serde_json::Value, masked: &serde_json::Value, out: &mut Vec<String>) {
        use serde_json::Value;
        match (orig, masked) {
            (o, Value::String(m)) if m == MASK && o != masked => leaves(o, out),
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in a {
                    if let Some(w) = b.get(k) {
                        hidden(v, w, out);
                    }
                }
            }
            (Value::Array(a), Value::Array(b)) => {
                a.iter().zip(b).for_each(|(v, w)| hidden(v, w, out));
            }
            _ => {}
        }
    }
    let mut seen = payload.clone();
    mask(&mut seen, pointers);
    let mut out = Vec::new();
    hidden(payload, &seen, &mut out);
    out.retain(|v| v.chars().count() >= MIN_REDACTED);
    out.sort_by_key(|v| std::cmp::Reverse(v.len()));
    out.dedup();
    out
}

/// Masked values shorter than this are not searched for elsewhere (a `1` would blot out every 1).
pub const MIN_REDACTED: usize = 4;

/// Replaces every occurrence of the `secrets` in every text of `value` (keys and values) with the
/// mask: an app that echoes a masked card number in its error, a key made of it, a header or a
/// history note would otherwise show a viewer what the payload hides.
pub fn redact(value: &mut serde_json::Value, secrets: &[String]) {
    use serde_json::Value;
    if secrets.is_empty() {
        return;
    }
    let clean = |s: &str| {
        let mut t = s.to_owned();
        for secret in secrets {
            if t.contains(secret.as_str()) {
                t = t.replace(secret.as_str(), MASK);
            }
        }
        t
    };
    match value {
        Value::String(s) => *s = clean(s),
        Value::Array(items) => items.iter_mut().for_each(|i| redact(i, secrets)),
        Value::Object(map) => {
            let entries = std::mem::take(map);
            for (k, mut v) in entries {
                redact(&mut v, secrets);
                map.insert(clean(&k), v);
            }
        }
        _ => {}
    }
}

fn mask_at(value: &mut serde_json::Value, segments: &[String]) {
    use serde_json::Value;

    let Some((segment, rest)) = segments.split_first() else {
        *value = Value::String(MASK.to_owned());
        return;
    };
    match value {
        Value::Object(map) if segment == "*" => {
            map.values_mut().for_each(|v| mask_at(v, rest));
        }
        Value::Object(map) => {
            if let Some(v) = map.get_mut(segment) {
                mask_at(v, rest);
            }
        }
        Value::Array(items) if segment == "*" => {
            items.iter_mut().for_each(|v| mask_at(v, rest));
        }
        Value::Array(items) => {
            if let Some(v) = array_index(segment).and_then(|i| items.get_mut(i)) {
                mask_at(v, rest);
            }
        }
        _ => {}
    }
}

/// An RFC 6901 array index: decimal digits without leading zeros.
fn array_index(segment: &str) -> Option<usize> {
    let digits_only = !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit());
    if !digits_only || (segment.len() > 1 && segment.starts_with('0')) {
        return None;
    }
    segment.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn client_addresses_come_from_trusted_proxies_only() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let proxies =
            TrustedProxies::parse(&["10.0.0.0/8".to_owned(), "192.0.2.1".to_owned()]).unwrap();
        // A peer that is no proxy: its header is its own say, ignored.
        assert_eq!(
            proxies.client_ip(ip("203.0.113.5"), ["198.51.100.1"]),
            ip("203.0.113.5")
        );
        // Through the proxies: the rightmost address that is not one of them.
        assert_eq!(
            proxies.client_ip(ip("10.1.2.3"), ["198.51.100.1, 203.0.113.9", "192.0.2.1"]),
            ip("203.0.113.9")
        );
        // Missing or unreadable where it counts: the proxy's own address.
        assert_eq!(proxies.client_ip(ip("10.1.2.3"), []), ip("10.1.2.3"));
        assert_eq!(
            proxies.client_ip(ip("10.1.2.3"), ["203.0.113.9, junk"]),
            ip("10.1.2.3")
        );
        assert!(TrustedProxies::parse(&["10.0.0.0/33".to_owned()]).is_err());
        assert!(TrustedProxies::parse(&["fd00::/8".to_owned()]).is_ok());
    }

    #[test]
    fn masked_values_are_hidden_wherever_they_appear() {
        let payload =
            json!({"card": "4111-1111", "cvv": 123, "amount": 5, "nested": {"pin": "9876"}});
        let secrets = masked_values(&payload, &["/card".into(), "/cvv".into(), "/nested".into()]);
        assert_eq!(secrets, vec!["4111-1111".to_owned(), "9876".to_owned()]);
        let mut shown = json!({
            "key": "4111-1111",
            "error": {"detail": "card 4111-1111 declined"},
            "headers": {"X-Card-4111-1111": ["9876"]},
            "n": 5,
        });
        redact(&mut shown, &secrets);
        assert_eq!(
            shown,
            json!({
                "key": "***",
                "error": {"detail": "card *** declined"},
                "headers": {"X-Card-***": ["***"]},
                "n": 5,
            })
        );
    }

    #[tokio::test]
    async fn password_checks_wait_for_room_then_give_up() {
        let checks = PasswordChecks::new(64);
        let phc = cheap_hash("pw");
        assert_eq!(
            checks
                .verify(phc.clone(), "pw".into(), Duration::from_millis(100))
                .await,
            Some(true)
        );
        // The budget is taken (checks under way): the next one is refused after its wait.
        let taken = checks.room.clone().acquire_many_owned(64).await.unwrap();
        assert_eq!(
            checks
                .verify(phc.clone(), "pw".into(), Duration::from_millis(50))
                .await,
            None
        );
        drop(taken);
        assert_eq!(
            checks
                .verify(phc, "nope".into(), Duration::from_millis(100))
                .await,
            Some(false)
        );
    }

    use super::*;
    use serde_json::json;

    /// A PHC hash with tiny costs so tests stay fast; argon2 takes its parameters from the string.
    fn cheap_hash(password: &str) -> String {
        let params = Params::new(8, 1, 1, None).unwrap();
        Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
            .hash_password_with_salt(password.as_bytes(), b"saltsaltsalt")
            .unwrap()
            .to_string()
    }

    // Passwords

    #[test]
    fn hash_password_is_argon2id_with_defaults_and_random_salt() {
        // The only two default-cost hashes in this file (~35 ms each).
        let a = hash_password("correct horse").unwrap();
        let b = hash_password("correct horse").unwrap();
        assert!(a.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{a}");
        assert_ne!(a, b, "each hash has its own salt");
        assert_eq!(check_hash(&a), Ok(()));
        assert!(verify_password(&a, "correct horse"));
        assert!(!verify_password(&b, "correct horsE"));
    }

    #[test]
    fn verify_password_uses_the_parameters_in_the_hash() {
        let phc = cheap_hash("s3cret");
        assert!(phc.starts_with("$argon2id$v=19$m=8,t=1,p=1$"), "{phc}");
        assert!(verify_password(&phc, "s3cret"));
        assert!(!verify_password(&phc, "s3cret "));
        assert!(!verify_password(&phc, ""));
    }

    #[test]
    fn verify_password_is_false_on_malformed_hashes() {
        let good = cheap_hash("pw");
        let huge_memory = good.replace("m=8,", "m=4294967295,");
        let truncated = &good[..good.len() - 5];
        for phc in [
            "",
            "pw",
            "$",
            "$argon2id$",
            "$argon2id$v=19$m=8,t=1,p=1",
            "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHRzYWx0",
            "$argon2id$v=99$m=8,t=1,p=1$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAA",
            "$argon2id$v=19$m=1,t=1,p=1$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAA",
            "$argon2id$v=19$m=8,t=1,p=1,x=2$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAA",
            "$pbkdf2-sha256$i=1000$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAA",
            "$argon2id$v=19$m=8,t=1,p=1$!!!$AAAA",
            "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAA$extra",
            "\u{0}\u{ff}☃",
            truncated,
            &huge_memory,
        ] {
            assert!(!verify_password(phc, "pw"), "{phc:?}");
            assert!(check_hash(phc).is_err(), "{phc:?}");
        }
    }

    #[test]
    fn check_hash_says_what_is_wrong() {
        let expect_err = |phc: &str, needle: &str| {
            let err = check_hash(phc).unwrap_err();
            assert!(err.contains(needle), "{phc:?}: {err}");
        };
        expect_err("", "empty");
        expect_err("hunter2", "not a PHC string");
        expect_err(
            "$pbkdf2-sha256$i=1000$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAA",
            "expected argon2id",
        );
        expect_err("$argon2id$v=19$m=8,t=1,p=1", "no salt");
        expect_err(
            "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHRzYWx0",
            "no hash output",
        );
        expect_err(
            "$argon2id$v=99$m=8,t=1,p=1$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAA",
            "version",
        );
        expect_err(
            "$argon2id$v=19$m=1,t=1,p=1$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAA",
            "parameters",
        );
        expect_err(
            "$argon2id$v=19$m=2097152,t=1,p=1$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAA",
            "memory cost",
        );
        expect_err(
            "$argon2id$v=19$m=8,t=65,p=1$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAA",
            "time cost",
        );
    }

    #[test]
    fn check_hash_accepts_other_argon2_variants_and_never_echoes_salt_or_output() {
        let argon2i = "$argon2i$v=19$m=8,t=1,p=1$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAA";
        assert_eq!(check_hash(argon2i), Ok(()));
        assert_eq!(check_hash(&argon2i.replace("argon2i", "argon2d")), Ok(()));

        let salt = "c2VjcmV0c2FsdHNlY3JldA";
        let output = "T3V0cHV0T3V0cHV0T3V0cHV0T3V0cHV0T3V0cHV0";
        for phc in [
            format!("$argon2id$v=19$m=1,t=1,p=1${salt}${output}"),
            format!("$argon2id$v=19$m=8,t=99,p=1${salt}${output}"),
            format!("$argon2id$v=19$m=8,t=1,p=1${salt}${output}!"),
            format!("$scrypt$ln=4,r=8,p=1${salt}${output}"),
        ] {
            let err = check_hash(&phc).unwrap_err();
            assert!(!err.contains(salt) && !err.contains(output), "{err}");
        }
    }

    // Roles

    #[test]
    fn roles_are_ordered_and_include_lower_roles() {
        use Role::*;
        assert!(Viewer < Operator && Operator < Admin);
        let allowed = |have: Role| [Viewer, Operator, Admin].map(|need| have.allows(need));
        assert_eq!(allowed(Viewer), [true, false, false]);
        assert_eq!(allowed(Operator), [true, true, false]);
        assert_eq!(allowed(Admin), [true, true, true]);
    }

    #[test]
    fn roles_parse_print_and_serialize_lowercase() {
        for (role, name) in [
            (Role::Viewer, "viewer"),
            (Role::Operator, "operator"),
            (Role::Admin, "admin"),
        ] {
            assert_eq!(role.to_string(), name);
            assert_eq!(name.parse::<Role>().unwrap(), role);
            assert_eq!(serde_json::to_value(role).unwrap(), json!(name));
            assert_eq!(serde_json::from_value::<Role>(json!(name)).unwrap(), role);
        }
        for bad in ["Admin", "root", "", " viewer"] {
            let err = bad.parse::<Role>().unwrap_err();
            assert!(matches!(err, AuthError::UnknownRole(ref s) if s == bad));
            assert!(err.to_string().contains("viewer, operator or admin"));
            assert!(serde_json::from_value::<Role>(json!(bad)).is_err());
        }
    }

    // API tokens

    const ABC_SHA256: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn token_digest_is_lowercase_hex_sha256() {
        assert_eq!(token_digest("abc"), ABC_SHA256);
        assert_eq!(
            token_digest(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn tokens_find_the_matching_entry() {
        let tokens = Tokens::new([
            ("ci", Role::Operator, token_digest("ci-token")),
            ("grafana", Role::Viewer, ABC_SHA256.to_uppercase()),
            ("ops", Role::Admin, token_digest("ops-token")),
        ])
        .unwrap();
        assert!(!tokens.is_empty());
        assert_eq!(tokens.check("ci-token"), Some(("ci", Role::Operator)));
        assert_eq!(tokens.check("abc"), Some(("grafana", Role::Viewer)));
        assert_eq!(tokens.check("ops-token"), Some(("ops", Role::Admin)));
        assert_eq!(tokens.check("ops-token "), None);
        assert_eq!(tokens.check(""), None);
        assert_eq!(
            tokens.check(ABC_SHA256),
            None,
            "the digest is not the token"
        );
        let debug = format!("{tokens:?}");
        assert!(
            debug.contains("grafana") && !debug.contains(ABC_SHA256),
            "{debug}"
        );
    }

    #[test]
    fn empty_tokens_match_nothing() {
        let tokens = Tokens::new(Vec::<(String, Role, String)>::new()).unwrap();
        assert!(tokens.is_empty());
        assert_eq!(tokens.check(""), None);
    }

    #[test]
    fn tokens_reject_bad_digests_naming_the_entry() {
        let short = &ABC_SHA256[..63];
        let long = format!("{ABC_SHA256}0");
        let not_hex = ABC_SHA256.replacen('b', "g", 1);
        let non_ascii = format!("{}é", &ABC_SHA256[..62]);
        for bad in [short, &long, &not_hex, &non_ascii, "", &format!(" {short}")] {
            let err = Tokens::new([("ok", Role::Viewer, ABC_SHA256), ("bad", Role::Admin, bad)])
                .unwrap_err();
            assert!(matches!(err, AuthError::TokenDigest { ref name } if name == "bad"));
            assert!(err.to_string().contains("\"bad\""), "{err}");
        }
    }

    #[test]
    fn tokens_reject_duplicate_names_and_digests() {
        let other = token_digest("other");
        let err = Tokens::new([
            ("ci", Role::Viewer, ABC_SHA256),
            ("ci", Role::Admin, &other),
        ])
        .unwrap_err();
        assert!(
            matches!(err, AuthError::DuplicateToken { ref name, what: "name" } if name == "ci")
        );
        let err = Tokens::new([
            ("ci", Role::Viewer, ABC_SHA256.to_owned()),
            ("ci2", Role::Admin, ABC_SHA256.to_uppercase()),
        ])
        .unwrap_err();
        assert!(
            matches!(err, AuthError::DuplicateToken { ref name, what: "sha256" } if name == "ci2")
        );
    }

    // Random secrets

    #[test]
    fn new_secret_is_32_random_bytes_in_base64url() {
        let a = new_secret();
        let b = new_secret();
        assert_eq!(a.len(), 43);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
            "{a}"
        );
        assert_eq!(URL_SAFE_NO_PAD.decode(&a).unwrap().len(), 32);
        assert_ne!(a, b);
    }

    #[test]
    fn secrets_equal_compares_exactly() {
        let s = new_secret();
        assert!(secrets_equal(&s, &s.clone()));
        assert!(secrets_equal("", ""));
        assert!(!secrets_equal(&s, &new_secret()));
        assert!(!secrets_equal(&s, &s[..42]));
        assert!(!secrets_equal(&s, ""));
        assert!(!secrets_equal("a", "A"));
    }

    // Login rate limiting

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn limiter_defaults() {
        let limiter = LoginLimiter::default();
        assert_eq!(limiter.max_failures, 5);
        assert_eq!(limiter.window, 15 * MIN);
        assert_eq!(limiter.max_keys, DEFAULT_MAX_KEYS);
    }

    #[test]
    fn limiter_blocks_after_max_failures_until_the_window_passes() {
        let limiter = LoginLimiter::new(3, 15 * MIN, 100);
        let t0 = Instant::now();
        let key = "10.0.0.1|alice";
        for i in 0..3 {
            assert_eq!(limiter.check(key, t0 + MIN * i), Ok(()));
            limiter.failed(key, t0 + MIN * i);
        }
        // Failures at 0, 1 and 2 min: blocked until the first one is 15 min old.
        assert_eq!(limiter.check(key, t0 + 2 * MIN), Err(13 * MIN));
        assert_eq!(limiter.check(key, t0 + 10 * MIN), Err(5 * MIN));
        assert_eq!(limiter.check(key, t0 + 15 * MIN), Ok(()));
        // Sliding: one more failure refills the window (failures at 1, 2 and 15 min).
        limiter.failed(key, t0 + 15 * MIN);
        assert_eq!(limiter.check(key, t0 + 15 * MIN), Err(MIN));
        assert_eq!(limiter.check(key, t0 + 16 * MIN), Ok(()));
        // Long after, everything has expired.
        assert_eq!(limiter.check(key, t0 + 60 * MIN), Ok(()));
        assert!(
            limiter.lock().is_empty(),
            "expired keys are dropped on check"
        );
    }

    #[test]
    fn limiter_spread_out_failures_never_block() {
        let limiter = LoginLimiter::new(2, 10 * MIN, 100);
        let t0 = Instant::now();
        for i in 0..10 {
            let now = t0 + 10 * MIN * i;
            assert_eq!(limiter.check("k", now), Ok(()));
            limiter.failed("k", now);
        }
    }

    #[test]
    fn limiter_success_clears_and_keys_are_independent() {
        let limiter = LoginLimiter::new(2, 15 * MIN, 100);
        let now = Instant::now();
        for key in ["ip|alice", "ip|bob"] {
            limiter.failed(key, now);
            limiter.failed(key, now);
        }
        assert!(limiter.check("ip|alice", now).is_err());
        assert_eq!(limiter.check("ip|carol", now), Ok(()));
        limiter.succeeded("ip|alice");
        assert_eq!(limiter.check("ip|alice", now), Ok(()));
        assert!(limiter.check("ip|bob", now).is_err());
    }

    #[test]
    fn limiter_failures_while_blocked_extend_the_block() {
        let limiter = LoginLimiter::new(2, 10 * MIN, 100);
        let t0 = Instant::now();
        limiter.failed("k", t0);
        limiter.failed("k", t0 + MIN);
        limiter.failed("k", t0 + 5 * MIN);
        assert_eq!(limiter.check("k", t0 + 5 * MIN), Err(6 * MIN));
        assert_eq!(limiter.lock().get(&key_id("k")).map(VecDeque::len), Some(2));
    }

    #[test]
    fn limiter_memory_is_bounded_evicting_the_oldest_key() {
        let limiter = LoginLimiter::new(1, 15 * MIN, 2);
        let t0 = Instant::now();
        limiter.failed("a", t0);
        limiter.failed("b", t0 + MIN);
        limiter.failed("a", t0 + 2 * MIN); // "a" is now the most recent.
        limiter.failed("c", t0 + 3 * MIN); // Full: evicts "b".
        assert_eq!(limiter.lock().len(), 2);
        let now = t0 + 3 * MIN;
        assert!(limiter.check("a", now).is_err());
        assert_eq!(limiter.check("b", now), Ok(()));
        assert!(limiter.check("c", now).is_err());
    }

    #[test]
    fn limiter_drops_expired_keys_before_evicting_live_ones() {
        let limiter = LoginLimiter::new(1, 10 * MIN, 2);
        let t0 = Instant::now();
        limiter.failed("old", t0);
        limiter.failed("live", t0 + 9 * MIN);
        // At 11 min "old" has expired even though it was never checked again.
        limiter.failed("new", t0 + 11 * MIN);
        let now = t0 + 11 * MIN;
        assert_eq!(limiter.lock().len(), 2);
        assert!(limiter.check("live", now).is_err());
        assert!(limiter.check("new", now).is_err());
    }

    #[test]
    fn limiter_tolerates_odd_input() {
        let limiter = LoginLimiter::new(0, Duration::ZERO, 0);
        let t0 = Instant::now();
        limiter.failed("k", t0);
        assert_eq!(
            limiter.check("k", t0),
            Ok(()),
            "a zero window forgets at once"
        );
        let limiter = LoginLimiter::new(1, Duration::MAX, 1);
        limiter.failed("k", t0 + MIN);
        // Time going backwards does not panic.
        assert!(limiter.check("k", t0).is_err());
        limiter.failed("k", t0);
    }

    #[test]
    fn limiter_is_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<LoginLimiter>();

        let limiter = LoginLimiter::new(100, 15 * MIN, 1000);
        let now = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| (0..25).for_each(|_| limiter.failed("k", now)));
            }
        });
        assert_eq!(limiter.check("k", now), Err(15 * MIN));
    }

    // Masking

    fn masked(mut value: serde_json::Value, pointers: &[&str]) -> serde_json::Value {
        let pointers: Vec<String> = pointers.iter().map(|p| (*p).to_owned()).collect();
        mask(&mut value, &pointers);
        value
    }

    #[test]
    fn mask_replaces_fields_elements_and_subtrees() {
        let doc = json!({
            "card": "4111",
            "customer": {"email": "a@b.c", "name": "Al"},
            "tags": ["x", "y"],
            "amount": 12.5
        });
        assert_eq!(
            masked(doc, &["/card", "/customer/email", "/tags/1"]),
            json!({
                "card": "***",
                "customer": {"email": "***", "name": "Al"},
                "tags": ["x", "***"],
                "amount": 12.5
            })
        );
        assert_eq!(
            masked(
                json!({"customer": {"email": "a"}, "n": null}),
                &["/customer", "/n"]
            ),
            json!({"customer": "***", "n": "***"})
        );
        assert_eq!(masked(json!({"a": 1}), &[""]), json!("***"));
    }

    #[test]
    fn mask_wildcards_match_every_key_or_element() {
        let doc = json!({
            "items": [{"card": "1", "sku": "a"}, {"card": "2"}, {"sku": "c"}, 7],
            "secrets": {"x": 1, "y": {"z": 2}}
        });
        assert_eq!(
            masked(doc, &["/items/*/card", "/secrets/*"]),
            json!({
                "items": [{"card": "***", "sku": "a"}, {"card": "***"}, {"sku": "c"}, 7],
                "secrets": {"x": "***", "y": "***"}
            })
        );
        assert_eq!(
            masked(json!([1, [2, 3]]), &["/*/*"]),
            json!([1, ["***", "***"]])
        );
    }

    #[test]
    fn mask_unescapes_tilde_and_slash() {
        let doc = json!({"a/b": 1, "m~n": 2, "~1": 3, "": 4});
        assert_eq!(
            masked(doc, &["/a~1b", "/m~0n", "/~01", "/"]),
            json!({"a/b": "***", "m~n": "***", "~1": "***", "": "***"})
        );
    }

    #[test]
    fn mask_ignores_absent_paths_and_bad_pointers() {
        let doc = json!({"a": {"b": "text"}, "list": [0, 1], "10": "ten"});
        let unchanged = [
            "/missing",
            "/a/b/c",
            "/a/x/y",
            "/list/2",
            "/list/-",
            "/list/01",
            "/list/+1",
            "/list/1e0",
            "/list/99999999999999999999999",
            "/a/*/deeper",
            "a",
            "/~2",
            "/a~",
        ];
        for p in unchanged {
            assert_eq!(masked(doc.clone(), &[p]), doc, "{p}");
        }
        // Object keys that look like indices are still keys.
        assert_eq!(masked(doc.clone(), &["/10"])["10"], json!("***"));
        assert_eq!(masked(json!("scalar"), &["/x", "/*"]), json!("scalar"));
        let mut value = doc.clone();
        mask(&mut value, &[]);
        assert_eq!(value, doc);
    }

    #[test]
    fn check_pointer_validates_config() {
        for ok in ["", "/", "/a", "/items/*/card", "/a~0b~1c", "/0"] {
            assert_eq!(check_pointer(ok), Ok(()), "{ok}");
        }
        for (bad, needle) in [
            ("a", "start with `/`"),
            ("#/a", "start with `/`"),
            ("/~", "~0"),
            ("/a~2", "~1"),
        ] {
            let err = check_pointer(bad).unwrap_err();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }
}

//! Who may do what with a session: every session remembers its [`Owner`],
//! and every request comes from an [`Actor`] that may see only its own
//! sessions or everyone's.
//!
//! Owners live in this process's memory only: the stored JSON carries no
//! user id.

use std::fmt;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use sha2::{Digest, Sha256};

/// Who started a session: `user:<supabase id>`, `key:<key id>`, or
/// `anonymous`. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Owner(Arc<str>);

impl Owner {
    /// A signed-in user, by their id.
    pub fn user(id: &str) -> Self {
        Self(format!("user:{id}").into())
    }

    /// A server caller, by its key's id (never the key).
    pub fn server(key_id: &str) -> Self {
        Self(format!("key:{key_id}").into())
    }

    /// A caller nobody can tell apart (no callers configured).
    pub fn anonymous() -> Self {
        Self(Arc::from("anonymous"))
    }

    /// An anonymous caller counted by its client address, so one address
    /// cannot take the whole service-wide cap. Its stored [`tag`](Self::tag)
    /// is the anonymous one: an address-derived hash would be personal data
    /// (IPv4 hashes are easily reversed).
    /// IPv6 clients count by their /64: one subscriber usually has a whole
    /// /64 and can pick any address in it.
    pub fn client(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self(format!("ip:{v4}").into()),
            IpAddr::V6(v6) => {
                let s = v6.segments();
                Self(format!("ip:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3]).into())
            }
        }
    }

    /// The owner of a session resumed from the store (another process
    /// started it), known only by the `tag` stored with it: the caller
    /// whose tag it is may touch it, as they could in the process that
    /// started it.
    pub fn tagged(tag: &str) -> Self {
        Self(format!("tag:{tag}").into())
    }

    /// A one-way tag of this owner for the stored state: equal owners get
    /// equal tags, and the tag does not give the user id back.
    pub fn tag(&self) -> String {
        if let Some(tag) = self.0.strip_prefix("tag:") {
            return tag.to_owned();
        }
        let owner = match self.0.starts_with("ip:") {
            true => "anonymous",
            false => &self.0,
        };
        let digest = Sha256::digest(format!("wa-pair owner v1:{owner}"));
        digest[..16]
            .iter()
            .fold(String::with_capacity(32), |mut hex, b| {
                let _ = write!(hex, "{b:02x}");
                hex
            })
    }
}

impl fmt::Debug for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A user id is an opaque UUID, not contact data, but it still
        // stays out of debug output of whole states.
        match self.0.split_once(':') {
            Some(("user", _)) => f.write_str("Owner(user)"),
            Some(("tag", _)) => f.write_str("Owner(tag)"),
            Some(("ip", _)) => f.write_str("Owner(ip)"),
            _ => write!(f, "Owner({})", self.0),
        }
    }
}

/// Who is asking, as the registry sees it.
#[derive(Debug, Clone)]
pub struct Actor {
    /// Recorded as the owner of the sessions this actor starts.
    pub owner: Owner,
    /// Whether the actor may read and act on sessions others started.
    pub sees_all: bool,
    /// Most sessions this actor may have open at once; `None`: only the
    /// service-wide `MAX_OPEN_SESSIONS`.
    pub open_limit: Option<usize>,
}

impl Actor {
    /// An actor that may touch every session and is only bounded by the
    /// service-wide cap (server callers, and everyone when no caller is
    /// configured).
    pub fn trusted(owner: Owner) -> Self {
        Self {
            owner,
            sees_all: true,
            open_limit: None,
        }
    }

    /// An anonymous actor told apart by its address: it may touch every
    /// session (anonymous callers cannot be held to their own), but has at
    /// most `open_limit` open.
    pub fn counted(owner: Owner, open_limit: usize) -> Self {
        Self {
            owner,
            sees_all: true,
            open_limit: Some(open_limit),
        }
    }

    /// An actor limited to its own sessions, at most `open_limit` open.
    pub fn restricted(owner: Owner, open_limit: usize) -> Self {
        Self {
            owner,
            sees_all: false,
            open_limit: Some(open_limit),
        }
    }

    /// Whether this actor may read or act on a session `owner` started.
    pub fn may_touch(&self, owner: &Owner) -> bool {
        // Either side may be known by its tag only (a session resumed from
        // another process, a command relayed from one).
        self.sees_all
            || self.owner == *owner
            || ((self.owner.0.starts_with("tag:") || owner.0.starts_with("tag:"))
                && self.owner.tag() == owner.tag())
    }

    /// Whether this actor may read or act on a stored session whose owner
    /// tag is `tag` (`None`: written without one, so only actors who see
    /// everything).
    pub fn may_touch_tagged(&self, tag: Option<&str>) -> bool {
        self.sees_all || tag == Some(self.owner.tag().as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restricted_actor_touches_only_its_own_sessions() {
        let alice = Actor::restricted(Owner::user("alice"), 5);

        assert!(alice.may_touch(&Owner::user("alice")));
        assert!(!alice.may_touch(&Owner::user("bob")));
        assert!(!alice.may_touch(&Owner::server("key-1")));
    }

    #[test]
    fn a_trusted_actor_touches_every_session() {
        let server = Actor::trusted(Owner::server("key-1"));

        assert!(server.may_touch(&Owner::user("alice")));
        assert!(server.may_touch(&Owner::anonymous()));
    }

    #[test]
    fn tags_match_their_owner_only_and_do_not_contain_the_id() {
        let alice = Actor::restricted(Owner::user("alice"), 5);
        let tag = Owner::user("alice").tag();

        assert_eq!(tag.len(), 32);
        assert!(!tag.contains("alice"));
        assert!(alice.may_touch_tagged(Some(&tag)));
        assert!(!alice.may_touch_tagged(Some(&Owner::user("bob").tag())));
        assert!(!alice.may_touch_tagged(None));
        assert!(Actor::trusted(Owner::anonymous()).may_touch_tagged(None));
    }

    #[test]
    fn a_resumed_session_is_touched_by_the_caller_whose_tag_it_carries() {
        let alice = Actor::restricted(Owner::user("alice"), 5);
        let bob = Actor::restricted(Owner::user("bob"), 5);
        let resumed = Owner::tagged(&Owner::user("alice").tag());

        assert!(alice.may_touch(&resumed));
        assert!(!bob.may_touch(&resumed));
        assert_eq!(resumed.tag(), Owner::user("alice").tag());
    }

    #[test]
    fn an_address_owner_is_counted_apart_but_stored_as_anonymous() {
        let a = Owner::client("203.0.113.1".parse().unwrap());
        let b = Owner::client("203.0.113.2".parse().unwrap());

        assert_ne!(a, b);
        assert_ne!(a, Owner::anonymous());
        assert_eq!(a.tag(), Owner::anonymous().tag());
        assert_eq!(format!("{a:?}"), "Owner(ip)");
    }

    #[test]
    fn ipv6_addresses_in_one_slash_64_are_one_owner() {
        let a = Owner::client("2001:db8:1:2::1".parse().unwrap());
        let b = Owner::client("2001:db8:1:2:ffff::9".parse().unwrap());
        let c = Owner::client("2001:db8:1:3::1".parse().unwrap());

        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn debug_output_does_not_show_user_ids() {
        let printed = format!("{:?}", Owner::user("5f1c7c1e"));

        assert!(!printed.contains("5f1c7c1e"), "{printed}");
    }
}

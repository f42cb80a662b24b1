//! Peers prove they belong: the cluster key, the connection handshake and per-frame MACs.
//!
//! - [`key`]: the cluster key file (32 random bytes, mode 0600), `vigil keygen`, and the
//!   [`KeyRing`] of a node (current key, optional next key).
//! - [`handshake`]: mutual challenge-response on a new peer connection (a pure state
//!   machine: bytes in, bytes out), which ends with a per-connection [`Session`].
//! - [`session`]: sealing and opening frames with a per-direction key and sequence number.
//!
//! All MACs are HMAC-SHA256 from RustCrypto's `hmac` and `sha2` crates; comparisons are
//! constant-time (`verify_slice`). The transport (`net::peers`) uses them like this: dial
//! or accept, run the [`Handshake`] until `Established` (closing on any error and counting
//! `HandshakeError::reason`), then [`session::Sealer::seal`] every frame it sends and
//! [`session::Opener::open`] every frame it receives, closing the connection on a
//! `MacError`.
//!
//! # Rotating the cluster key without downtime
//!
//! A node holds its current key and, optionally, a next key, and accepts a peer that
//! proves either (the responder picks the first of its keys, current first, that the
//! initiator offers). A rolling restart therefore moves a cluster from key A to key B
//! with every pair of members sharing a key at every moment:
//!
//! 1. Generate the new key once: `vigil keygen /etc/vigil/cluster.key.next` (it prints the
//!    key id), and copy the file (mode 0600) to every host.
//! 2. Restart the members one at a time with current key A and next key B; wait until each
//!    has rejoined (`vigil ctl status`) before restarting the next. A member on A alone and
//!    a member on A+B share A.
//! 3. Only when every member holds A+B: restart them one at a time with B alone (B as the
//!    current key, no next key). A member on A+B and a member on B share B.
//! 4. Delete key A from every host.
//!
//! Never start step 3 before step 2 is complete: a member on B alone shares no key with
//! a member on A alone. A member that shares no key with a peer refuses the connection
//! and logs `no cluster key in common` with both sides' key ids. A compromised key is
//! rotated the same way, as fast as the restarts allow.

pub mod handshake;
pub mod key;
pub mod session;

/// Loads a node's keys at start: the current key file and, during a rotation, the next
/// one. Each must be mode 0600 or stricter (see [`ClusterKey::load`]); the error names the
/// file and says why.
pub fn load_key_ring(
    current: &std::path::Path,
    next: Option<&std::path::Path>,
) -> Result<KeyRing, String> {
    let current = ClusterKey::load(current).map_err(|e| e.to_string())?;
    let next = match next {
        Some(path) => {
            let key = ClusterKey::load(path).map_err(|e| e.to_string())?;
            if key.id() == current.id() {
                return Err(format!(
                    "{}: the next key is the current key (key id {}); generate a new one with \
                     `vigil keygen`",
                    path.display(),
                    key.id()
                ));
            }
            Some(key)
        }
        None => None,
    };
    Ok(KeyRing::new(current, next))
}

pub use handshake::{Established, Handshake, HandshakeError, Step};
pub use key::{write_key_file, ClusterKey, KeyFileError, KeyId, KeyRing, KEY_BYTES};
pub use session::{MacError, Opener, Sealer, Session, TAG_BYTES};

//! Mirror sets in the superblock: who the members of a set are, which of them hold the
//! volume's current contents, and where to find them.
//!
//! A mirrored volume is two or three *members* (files or devices), each a complete volume with
//! the same UUID, geometry, metadata and data. Each member's superblock sets the
//! [`INCOMPAT_MIRROR`] feature bit and carries a [`MirrorInfo`]: the set's identity, the
//! member's index (its *role*), every member's identity and health, and an event counter
//! raised at every change of membership or health — so of several superblocks that disagree,
//! the one with the highest event tells the truth. Paths are only hints, kept in one
//! [`MemberRecord`] sector per member after the superblock structure; what makes a file a
//! member is its superblock.

use super::superblock::{at, SuperblockError};

/// Incompatible feature bit 0: the volume is a member of a mirror set. Builds without mirror
/// support refuse such a member rather than write to one copy only.
pub const INCOMPAT_MIRROR: u64 = 1;

/// Most members of a set.
pub const MAX_MEMBERS: usize = 3;

/// One member as every superblock of the set describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MemberInfo {
    /// The member's identity: random at the member's creation, so a replaced device that
    /// comes back is never taken for its replacement.
    pub id: [u8; 16],
    /// Holds the volume's current contents. A member that missed writes (it failed, or was
    /// absent at open) is out of sync until it is resynchronized: never read, never trusted.
    pub in_sync: bool,
    /// Out of sync by more than the write-intent map records: a member being built (added,
    /// not yet complete), or one found older than the set at open (a stale copy put back).
    /// Its resync copies every written group, not only the marked ones. Stored as health 2.
    pub full_copy: bool,
}

/// A member superblock's view of its mirror set.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MirrorInfo {
    /// The set's identity (non-zero), the same in every member.
    pub set: [u8; 16],
    /// This member's index in `members`.
    pub role: u8,
    /// Every member, in role order (2 ..= [`MAX_MEMBERS`]).
    pub members: Vec<MemberInfo>,
    /// Raised at every change of `members`: the highest event among the superblocks found is
    /// the set's current description.
    pub event: u64,
}

impl MirrorInfo {
    /// This member's own entry.
    pub fn me(&self) -> &MemberInfo {
        &self.members[usize::from(self.role)]
    }

    /// Writes the fields into a superblock structure (the feature bit is the caller's).
    pub(crate) fn encode(&self, b: &mut [u8]) {
        b[at::MIRROR_SET..at::MIRROR_ROLE].copy_from_slice(&self.set);
        b[at::MIRROR_ROLE] = self.role;
        b[at::MIRROR_MEMBERS] = u8::try_from(self.members.len()).unwrap_or(u8::MAX);
        for (i, m) in self.members.iter().enumerate() {
            b[at::MIRROR_HEALTH + i] = match (m.in_sync, m.full_copy) {
                (true, _) => 0,
                (false, false) => 1,
                (false, true) => 2,
            };
            let id = at::MIRROR_IDS + 16 * i;
            b[id..id + 16].copy_from_slice(&m.id);
        }
        b[at::MIRROR_EVENT..at::MIRROR_EVENT + 8].copy_from_slice(&self.event.to_le_bytes());
    }

    /// Reads and validates the fields of a superblock structure whose feature bit is set.
    pub(crate) fn decode(b: &[u8]) -> Result<MirrorInfo, SuperblockError> {
        let bad = |detail: String| SuperblockError::Field {
            field: "mirror set",
            detail,
        };
        let mut set = [0u8; 16];
        set.copy_from_slice(&b[at::MIRROR_SET..at::MIRROR_ROLE]);
        if set == [0; 16] {
            return Err(bad("the set identity is zero".into()));
        }
        let count = usize::from(b[at::MIRROR_MEMBERS]);
        if !(2..=MAX_MEMBERS).contains(&count) {
            return Err(bad(format!("{count} members, 2 to {MAX_MEMBERS} allowed")));
        }
        let role = b[at::MIRROR_ROLE];
        if usize::from(role) >= count {
            return Err(bad(format!("role {role} in a set of {count}")));
        }
        let mut members = Vec::with_capacity(count);
        for i in 0..MAX_MEMBERS {
            let health = b[at::MIRROR_HEALTH + i];
            let off = at::MIRROR_IDS + 16 * i;
            let mut id = [0u8; 16];
            id.copy_from_slice(&b[off..off + 16]);
            if i >= count {
                if health != 0 || id != [0; 16] {
                    return Err(bad(format!("member slot {i} is used in a set of {count}")));
                }
                continue;
            }
            if health > 2 {
                return Err(bad(format!("member {i} has unknown health {health}")));
            }
            if id == [0; 16] || members.iter().any(|m: &MemberInfo| m.id == id) {
                return Err(bad(format!("member {i} has a zero or repeated identity")));
            }
            members.push(MemberInfo {
                id,
                in_sync: health == 0,
                full_copy: health == 2,
            });
        }
        let event = u64::from_le_bytes(
            b[at::MIRROR_EVENT..at::MIRROR_EVENT + 8]
                .try_into()
                .map_err(|_| bad("event field cut short".into()))?,
        );
        Ok(MirrorInfo {
            set,
            role,
            members,
            event,
        })
    }

    /// True if the mirror fields of `b` are all zero (a volume without the feature bit).
    pub(crate) fn fields_zero(b: &[u8]) -> bool {
        b[at::MIRROR_SET..=at::MIRROR_ROLE].iter().all(|&c| c == 0)
            && b[at::MIRROR_MEMBERS..at::MIRROR_END].iter().all(|&c| c == 0)
    }
}

/// Magic of a member record sector.
pub const MEMBER_MAGIC: [u8; 8] = *b"BGMEMBER";

/// Most bytes of a member's path in its record.
pub const MAX_MEMBER_PATH: usize = 472;

/// Offset, inside a superblock region, of member `index`'s record (one 512-byte sector after
/// the superblock structure for each member).
pub fn member_record_offset(index: usize) -> usize {
    512 * (1 + index)
}

/// Where member `index` was last seen: a hint for finding it, kept next to every superblock.
/// Layout (512 bytes, little-endian): magic `BGMEMBER` (0..8), set identity (8..24), member
/// identity (24..40), index u8 (40), three zero bytes, path length u16 (44..46), two zero
/// bytes, path (48..48 + length, UTF-8, at most [`MAX_MEMBER_PATH`] bytes, zero-padded),
/// crc32c of bytes 0..508 (508..512).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberRecord {
    /// The set's identity.
    pub set: [u8; 16],
    /// The member's identity.
    pub id: [u8; 16],
    /// The member's index.
    pub index: u8,
    /// Its path when the record was written.
    pub path: String,
}

impl MemberRecord {
    /// Encodes the record into one 512-byte sector. A path longer than [`MAX_MEMBER_PATH`]
    /// bytes is refused.
    pub fn encode(&self) -> Result<[u8; 512], String> {
        let path = self.path.as_bytes();
        if path.len() > MAX_MEMBER_PATH {
            return Err(format!(
                "member path {} is {} bytes, at most {MAX_MEMBER_PATH} fit",
                self.path,
                path.len()
            ));
        }
        let mut b = [0u8; 512];
        b[..8].copy_from_slice(&MEMBER_MAGIC);
        b[8..24].copy_from_slice(&self.set);
        b[24..40].copy_from_slice(&self.id);
        b[40] = self.index;
        b[44..46].copy_from_slice(&u16::try_from(path.len()).unwrap_or(0).to_le_bytes());
        b[48..48 + path.len()].copy_from_slice(path);
        let crc = crc32c::crc32c(&b[..508]);
        b[508..].copy_from_slice(&crc.to_le_bytes());
        Ok(b)
    }

    /// Decodes a record sector; `None` if it is blank, damaged or malformed (a hint is then
    /// missing, nothing worse).
    pub fn decode(b: &[u8]) -> Option<MemberRecord> {
        let b = b.get(..512)?;
        if b[..8] != MEMBER_MAGIC {
            return None;
        }
        let stored = u32::from_le_bytes(b[508..512].try_into().ok()?);
        if stored != crc32c::crc32c(&b[..508]) {
            return None;
        }
        let len = usize::from(u16::from_le_bytes(b[44..46].try_into().ok()?));
        if len > MAX_MEMBER_PATH {
            return None;
        }
        let path = String::from_utf8(b[48..48 + len].to_vec()).ok()?;
        let mut set = [0u8; 16];
        set.copy_from_slice(&b[8..24]);
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[24..40]);
        Some(MemberRecord {
            set,
            id,
            index: b[40],
            path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> MirrorInfo {
        MirrorInfo {
            set: [7; 16],
            role: 1,
            members: vec![
                MemberInfo {
                    id: [1; 16],
                    in_sync: true,
                    full_copy: false,
                },
                MemberInfo {
                    id: [2; 16],
                    in_sync: false,
                    full_copy: true,
                },
            ],
            event: 42,
        }
    }

    #[test]
    fn mirror_fields_round_trip_and_are_checked() {
        let mut b = vec![0u8; 512];
        assert!(MirrorInfo::fields_zero(&b));
        info().encode(&mut b);
        assert!(!MirrorInfo::fields_zero(&b));
        assert_eq!(MirrorInfo::decode(&b), Ok(info()));
        let mut bad = b.clone();
        bad[at::MIRROR_MEMBERS] = 4;
        assert!(MirrorInfo::decode(&bad).is_err());
        let mut bad = b.clone();
        bad[at::MIRROR_ROLE] = 2;
        assert!(MirrorInfo::decode(&bad).is_err());
        let mut bad = b.clone();
        bad[at::MIRROR_IDS + 16..at::MIRROR_IDS + 32].copy_from_slice(&[1; 16]);
        assert!(MirrorInfo::decode(&bad).is_err(), "repeated member identity");
        let mut bad = b.clone();
        bad[at::MIRROR_HEALTH + 2] = 1;
        assert!(MirrorInfo::decode(&bad).is_err(), "unused slot in use");
        let mut bad = b;
        bad[at::MIRROR_SET..at::MIRROR_ROLE].fill(0);
        assert!(MirrorInfo::decode(&bad).is_err(), "zero set identity");
    }

    #[test]
    fn member_records_round_trip_and_damage_reads_as_missing() {
        let r = MemberRecord {
            set: [7; 16],
            id: [2; 16],
            index: 1,
            path: "/var/lib/vm/disk.mirror".into(),
        };
        let b = r.encode().expect("short path");
        assert_eq!(MemberRecord::decode(&b), Some(r.clone()));
        for i in [0, 9, 44, 100, 510] {
            let mut d = b;
            d[i] ^= 0x10;
            assert_eq!(MemberRecord::decode(&d), None, "flip at {i}");
        }
        assert_eq!(MemberRecord::decode(&[0u8; 512]), None);
        let long = MemberRecord {
            path: "x".repeat(MAX_MEMBER_PATH + 1),
            ..r
        };
        assert!(long.encode().is_err());
    }
}

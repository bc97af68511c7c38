//! The superblock: a self-describing header kept in two places (offset 0 and the backend's
//! last 4 KiB), each copy with its own crc32c.

use super::geometry::Geometry;
use super::mirror::{MirrorInfo, INCOMPAT_MIRROR};
use super::{le16, le32, le64};
use crate::cast::{u32_of_small, usize_of};
use crate::tag::Profile;
use serde::Serialize;
use std::fmt::Write as _;

/// Magic at byte 0 of both superblock copies.
pub const SB_MAGIC: [u8; 8] = *b"BLKGUARD";
/// The format version this build writes and reads. Version 1 (blockguard 0.1) kept one
/// checksum per metadata block, so a torn metadata write could lose the only tag of data on
/// disk; version 2 checksums every 512-byte metadata sector on its own; version 3 keeps two
/// copies of every group bitmap, far apart; version 4 gives every metadata sector a header
/// check of its own, so a sector whose body is damaged still proves its generation.
pub const FORMAT_VERSION: u32 = 4;
/// Bytes reserved for each superblock copy.
pub const SB_REGION: u64 = 4096;
/// Bytes of the structure covered by the checksum (the rest of the region is zero). 512 bytes
/// so a single sector holds it: a superblock write can never be torn across sectors.
pub const SB_STRUCT_SIZE: usize = 512;
const CRC_AT: usize = at::CHECKSUM;
const LABEL_LEN: usize = 64;
/// Byte offsets of the superblock's fields (`docs/FORMAT.md`, "Superblock"), each derived from
/// the one before, so encode, decode and the layout test cannot disagree.
pub(crate) mod at {
    /// `magic`, 8 bytes.
    pub(crate) const MAGIC: usize = 0;
    /// `version`, u32.
    pub(crate) const VERSION: usize = MAGIC + 8;
    /// `struct_size`, u32.
    pub(crate) const STRUCT_SIZE: usize = VERSION + 4;
    /// `compat`, u64.
    pub(crate) const COMPAT: usize = STRUCT_SIZE + 4;
    /// `ro_compat`, u64.
    pub(crate) const RO_COMPAT: usize = COMPAT + 8;
    /// `incompat`, u64.
    pub(crate) const INCOMPAT: usize = RO_COMPAT + 8;
    /// `uuid`, 16 bytes.
    pub(crate) const UUID: usize = INCOMPAT + 8;
    /// `block_size`, u32.
    pub(crate) const BLOCK_SIZE: usize = UUID + 16;
    /// `profile`, u16.
    pub(crate) const PROFILE: usize = BLOCK_SIZE + 4;
    /// `tag_size`, u16.
    pub(crate) const TAG_SIZE: usize = PROFILE + 2;
    /// `mode`, u8.
    pub(crate) const MODE: usize = TAG_SIZE + 2;
    /// `copy`, u8.
    pub(crate) const COPY: usize = MODE + 1;
    /// `meta_per_group`, u16.
    pub(crate) const META_PER_GROUP: usize = COPY + 1;
    /// `group_blocks`, u32.
    pub(crate) const GROUP_BLOCKS: usize = META_PER_GROUP + 2;
    /// `size`, u64.
    pub(crate) const SIZE: usize = GROUP_BLOCKS + 4;
    /// `data_blocks`, u64.
    pub(crate) const DATA_BLOCKS: usize = SIZE + 8;
    /// `groups`, u64.
    pub(crate) const GROUPS: usize = DATA_BLOCKS + 8;
    /// `first_group_offset`, u64.
    pub(crate) const FIRST_GROUP: usize = GROUPS + 8;
    /// `backing_len`, u64.
    pub(crate) const BACKING_LEN: usize = FIRST_GROUP + 8;
    /// `backup_sb_offset`, u64.
    pub(crate) const BACKUP_SB: usize = BACKING_LEN + 8;
    /// `created`, u64.
    pub(crate) const CREATED: usize = BACKUP_SB + 8;
    /// `mirror_set`, 16 bytes.
    pub(crate) const MIRROR_SET: usize = CREATED + 8;
    /// `mirror_role`, u8.
    pub(crate) const MIRROR_ROLE: usize = MIRROR_SET + 16;
    /// `state`, u8.
    pub(crate) const STATE: usize = MIRROR_ROLE + 1;
    /// Two bytes of padding.
    pub(crate) const PADDING: usize = STATE + 1;
    /// `meta_device`, 16 bytes.
    pub(crate) const META_DEVICE: usize = PADDING + 2;
    /// `label`, 64 bytes.
    pub(crate) const LABEL: usize = META_DEVICE + 16;
    /// `mirror_members`, u8 (with the mirror feature; zero without).
    pub(crate) const MIRROR_MEMBERS: usize = LABEL + super::LABEL_LEN;
    /// `mirror_health`, one u8 per member slot (3).
    pub(crate) const MIRROR_HEALTH: usize = MIRROR_MEMBERS + 1;
    /// `mirror_event`, u64.
    pub(crate) const MIRROR_EVENT: usize = MIRROR_HEALTH + 3;
    /// `mirror_ids`, 16 bytes per member slot (3).
    pub(crate) const MIRROR_IDS: usize = MIRROR_EVENT + 8;
    /// End of the mirror fields.
    pub(crate) const MIRROR_END: usize = MIRROR_IDS + 16 * super::super::mirror::MAX_MEMBERS;
    /// `error_policy`, u8: what the volume does about a block with no good copy.
    pub(crate) const ERROR_POLICY: usize = MIRROR_END;
    /// Seven bytes of padding, so the key check starts 8-byte aligned.
    pub(crate) const PADDING2: usize = ERROR_POLICY + 1;
    /// `key_check`, 32 bytes: a keyed profile's key-check value (zero for the others).
    pub(crate) const KEY_CHECK: usize = PADDING2 + 7;
    /// `journal_len`, u64: bytes of the journal area (`journal` mode; zero otherwise).
    pub(crate) const JOURNAL_LEN: usize = KEY_CHECK + crate::tag::KEY_CHECK_SIZE;
    /// `retag_profile`, u16: the profile an online re-tag is switching to (0: none).
    pub(crate) const RETAG_PROFILE: usize = JOURNAL_LEN + 8;
    /// Six zero bytes after it.
    pub(crate) const RETAG_PADDING: usize = RETAG_PROFILE + 2;
    /// `retag_cursor`, u64: groups `0..cursor` carry the target profile's tags.
    pub(crate) const RETAG_CURSOR: usize = RETAG_PADDING + 6;
    /// `retag_key_check`, 32 bytes: the target profile's key-check value (keyed targets).
    pub(crate) const RETAG_KEY_CHECK: usize = RETAG_CURSOR + 8;
    /// Reserved up to the checksum.
    pub(crate) const RESERVED: usize = RETAG_KEY_CHECK + crate::tag::KEY_CHECK_SIZE;
    /// `checksum`, u32: the last four bytes of the structure.
    pub(crate) const CHECKSUM: usize = super::SB_STRUCT_SIZE - 4;
}

// The fields fit the structure without overlapping the checksum, and sit where every version
// of FORMAT.md has said they do.
const _: () = assert!(at::RESERVED <= at::CHECKSUM);
const _: () = assert!(at::MODE == 64 && at::STATE == 145 && at::LABEL == 164 && at::CHECKSUM == 508);
const _: () = assert!(at::MIRROR_MEMBERS == 228 && at::MIRROR_EVENT == 232 && at::MIRROR_END == 288);
const _: () = assert!(at::ERROR_POLICY == 288 && at::KEY_CHECK == 296 && at::JOURNAL_LEN == 328);
const _: () = assert!(at::RETAG_PROFILE == 336 && at::RETAG_CURSOR == 344 && at::RESERVED == 384);

/// Incompatible feature bit 1: the volume's tag profile is not `crc32c` (the only profile
/// before profiles became pluggable). Builds without pluggable profiles would refuse such a
/// volume anyway, for its unknown profile id, but as a damaged superblock; with the bit they
/// call it what it is, unsupported. Set exactly when the profile is not `crc32c`.
pub const INCOMPAT_TAG_PROFILE: u64 = 1 << 1;

/// Incompatible feature bit 2 of a volume in `rebuild` mode: its tags may disagree with its
/// data after a crash until they are rebuilt, which a reader that does not know the mode would
/// report as corruption. Set exactly when `mode` is `rebuild`.
pub const INCOMPAT_REBUILD: u64 = 1 << 2;

/// Incompatible feature bit 3 of a volume in `journal` mode: the newest version of recently
/// written blocks may be only in the journal after a crash, so a reader that does not replay
/// it would return older data. Set exactly when `mode` is `journal`.
pub const INCOMPAT_JOURNAL: u64 = 1 << 3;

/// Incompatible feature bit 4: the volume's data is on a separate data device (at the offsets
/// of a raw image) and this device holds only its metadata; `meta_device` names the pair. A
/// reader that does not know it would take the metadata device for the whole volume.
pub const INCOMPAT_META_DEVICE: u64 = 1 << 4;

/// Incompatible feature bit 5: an online re-tag to another profile is in progress (see
/// [`Retag`]): the groups before its cursor carry the target profile's tags, and a reader that
/// does not know it would verify them with the volume's profile and report every block of them
/// corrupt. Set exactly when `retag_profile` is not zero.
pub const INCOMPAT_RETAG: u64 = 1 << 5;

/// Incompatible feature bit 6: the volume's tag slots (`tag_size`) are wider than its
/// profile's tags, or than a re-tag's target's, which are stored padded with zeros — room
/// left at format (`--tag-room`) for a later re-tag to a profile with larger tags, or by a
/// re-tag to smaller ones. A reader that does not know it would lay the tags out by the
/// profile's size. Set exactly when `tag_size` differs from the profile's tag size or, with a
/// re-tag in progress, from the target's.
pub const INCOMPAT_TAG_ROOM: u64 = 1 << 6;

/// Incompatible features this build supports: mirror sets, tag profiles other than `crc32c`,
/// `rebuild` and `journal` modes, a separate metadata device, a re-tag in progress. A volume
/// with any other incompat bit set is refused.
pub const SUPPORTED_INCOMPAT: u64 = INCOMPAT_MIRROR
    | INCOMPAT_TAG_PROFILE
    | INCOMPAT_REBUILD
    | INCOMPAT_JOURNAL
    | INCOMPAT_META_DEVICE
    | INCOMPAT_RETAG
    | INCOMPAT_TAG_ROOM;
/// Read-only-compatible features this build supports; others force read-only opens.
pub const SUPPORTED_RO_COMPAT: u64 = 0;

/// How tags are kept consistent with data across crashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Mode {
    /// No crash protection: data and tags are written without ordering. For comparison only.
    None,
    /// Brother metadata blocks: new tags durable before data, the old tag kept until the data
    /// is durable. The default.
    Dual,
    /// Data and tags written without ordering (one tag copy, rewritten in place); the groups
    /// with writes in flight are marked in the write-intent map first, and after a crash their
    /// tags are recomputed from the data. No false alarms and no extra barrier per write, but
    /// damage that happens inside the crash window in those groups (a torn block among them)
    /// cannot be detected.
    Rebuild,
    /// Full data journaling: every batch of writes goes first to a log of checksummed
    /// segments (one barrier makes it durable), then home. After a crash the log is replayed,
    /// so every write request up to the journal's atomic size is entirely old or entirely
    /// new, torn writes included. Costs writing the data twice.
    Journal,
}

impl Mode {
    /// Every mode this build knows.
    pub const ALL: [Mode; 4] = [Mode::Dual, Mode::Journal, Mode::Rebuild, Mode::None];

    /// The byte stored in the superblock.
    pub fn id(self) -> u8 {
        match self {
            Mode::None => 0,
            Mode::Dual => 1,
            Mode::Journal => 2,
            Mode::Rebuild => 3,
        }
    }
    /// The mode with a stored byte, if this build knows it.
    pub fn from_id(id: u8) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.id() == id)
    }
    /// Command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Dual => "dual",
            Mode::Journal => "journal",
            Mode::Rebuild => "rebuild",
        }
    }
    /// Parses a command-line name.
    pub fn from_name(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.name() == s)
    }
    /// Tags are kept in one copy (slot 0), rewritten in place: no brothers.
    pub fn single_copy_tags(self) -> bool {
        matches!(self, Mode::None | Mode::Rebuild | Mode::Journal)
    }

    /// The incompatible feature bit a volume in this mode carries (zero: none).
    pub fn incompat(self) -> u64 {
        match self {
            Mode::Rebuild => INCOMPAT_REBUILD,
            Mode::Journal => INCOMPAT_JOURNAL,
            Mode::None | Mode::Dual => 0,
        }
    }
}

/// What the volume does when a read finds a block with no good copy left: it fails
/// verification and no mirror member holds a copy that verifies (or the volume has no
/// mirror). Whatever the policy, that read fails with the typed corruption error naming the
/// block: wrong data is never returned. The policies differ in what happens besides
/// (`docs/CONSISTENCY.md`, "Error policy").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorPolicy {
    /// The read fails, and every such failure is logged; nothing else changes. The default,
    /// and the meaning of a volume formatted before the policy existed (stored byte 0).
    #[default]
    Eio,
    /// The read fails, and from the first such block on the volume refuses writes, and
    /// flushes that would commit staged writes, naming the block and the way out, until an
    /// operator clears the error state or the volume is reopened.
    ReadOnly,
    /// The read fails, but the volume carries on as if nothing else happened: no suspension,
    /// and the failure is logged once per block (later failures of the same block are only
    /// counted, with a summary line at most every few seconds). For salvaging data from a
    /// damaged volume, where the same bad blocks are read again and again.
    Continue,
}

impl ErrorPolicy {
    /// Every policy, in stored-byte order.
    pub const ALL: [ErrorPolicy; 3] = [ErrorPolicy::Eio, ErrorPolicy::ReadOnly, ErrorPolicy::Continue];

    /// The byte stored in the superblock.
    pub fn id(self) -> u8 {
        match self {
            ErrorPolicy::Eio => 0,
            ErrorPolicy::ReadOnly => 1,
            ErrorPolicy::Continue => 2,
        }
    }
    /// The policy with a stored byte, if this build knows it.
    pub fn from_id(id: u8) -> Option<ErrorPolicy> {
        Self::ALL.into_iter().find(|p| p.id() == id)
    }
    /// Command-line name.
    pub fn name(self) -> &'static str {
        match self {
            ErrorPolicy::Eio => "eio",
            ErrorPolicy::ReadOnly => "read-only",
            ErrorPolicy::Continue => "continue",
        }
    }
    /// Parses a command-line name.
    pub fn from_name(s: &str) -> Option<ErrorPolicy> {
        Self::ALL.into_iter().find(|p| p.name() == s)
    }
}

/// Why a superblock copy was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SuperblockError {
    /// The bytes are not a blockguard superblock at all.
    #[error(
        "no blockguard superblock (magic {}, expected \"BLKGUARD\")",
        show_magic(*found)
    )]
    BadMagic {
        /// The first eight bytes of the copy.
        found: [u8; 8],
    },
    /// The checksum does not match: the copy is damaged.
    #[error("superblock checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadChecksum {
        /// The checksum stored in the copy.
        stored: u32,
        /// The checksum of the bytes it covers.
        computed: u32,
    },
    /// Written by a newer (or unknown, or retired) format version.
    #[error("format version {found} is not supported (this build reads version {FORMAT_VERSION}){}", version_hint(*found))]
    Version {
        /// The version the copy states.
        found: u32,
    },
    /// Uses features this build does not implement.
    #[error("volume uses incompatible features {0:#x} this build does not support")]
    Incompat(u64),
    /// A tag profile this build does not know (written by a newer build).
    #[error(
        "tag profile id {id} is unknown to this build (it knows {}): the volume was made by a newer blockguard",
        known_profiles()
    )]
    Profile {
        /// The stored profile id.
        id: u16,
    },
    /// A field holds a value that cannot be valid.
    #[error("superblock field {field} is invalid: {detail}")]
    Field {
        /// Which field (or consistency check across fields).
        field: &'static str,
        /// Its value and why it cannot be valid.
        detail: String,
    },
}

/// Whether the volume was closed cleanly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeState {
    /// Closed cleanly: every group's newest metadata block describes durable data, so readers
    /// accept only the newest tags (stale or zeroed blocks are caught).
    Clean,
    /// Open for writing, or not closed cleanly: after a crash a group's older metadata block
    /// may still describe the data on disk, so readers accept either brother's tag.
    InUse,
}

/// The decoded superblock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Superblock {
    /// Format version (1).
    pub version: u32,
    /// Compatible feature flags (ignored by readers that do not know them).
    pub compat: u64,
    /// Read-only-compatible feature flags.
    pub ro_compat: u64,
    /// Incompatible feature flags.
    pub incompat: u64,
    /// Volume identity, bound into every tag and metadata block.
    pub uuid: [u8; 16],
    /// Tag profile.
    pub profile: Profile,
    /// Consistency mode.
    pub mode: Mode,
    /// Layout.
    pub geometry: Geometry,
    /// Unix time of format.
    pub created: u64,
    /// The mirror set this volume is a member of (with the [`INCOMPAT_MIRROR`] feature bit).
    pub mirror: Option<MirrorInfo>,
    /// Identity of a separate metadata device (all zero: tags inline). Reserved in v1.
    pub meta_device: [u8; 16],
    /// Free-form label.
    pub label: String,
    /// Clean or in use (byte 145; the only field rewritten after format).
    pub state: VolumeState,
    /// What the volume does about a block with no good copy (byte 288; 0 = `eio`).
    pub error_policy: ErrorPolicy,
    /// A keyed profile's key-check value (bytes 296..328): recognizes the right key without
    /// revealing it. All zero for unkeyed profiles.
    pub key_check: [u8; crate::tag::KEY_CHECK_SIZE],
    /// An online re-tag in progress (bytes 336..384, with [`INCOMPAT_RETAG`]).
    pub retag: Option<Retag>,
}

/// An online re-tag in progress: the volume is switching from `profile` to `target`, group by
/// group in order. Groups `0..cursor` carry `target`'s tags; the others carry `profile`'s,
/// except that groups at or after the cursor may already hold some of `target`'s (a re-tag
/// goes ahead of its last recorded cursor), so a reader accepts either profile there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Retag {
    /// The profile being switched to: another profile whose tags fit the volume's tag slots.
    pub target: Profile,
    /// Groups `0..cursor` are re-tagged (at most the group count).
    pub cursor: u64,
    /// `target`'s key-check value when it is keyed; for an unkeyed target of a keyed volume
    /// the seal of the re-tag under the volume's key ([`crate::tag::Tagger::retag_seal`]);
    /// else all zero.
    #[serde(skip)]
    pub key_check: [u8; crate::tag::KEY_CHECK_SIZE],
}

/// Checks a label before it is stored: UTF-8 (guaranteed by `&str`), at most 64 bytes, no
/// NUL bytes (NUL terminates the stored label).
pub fn validate_label(label: &str) -> Result<(), String> {
    if label.len() > LABEL_LEN {
        return Err(format!("label is {} bytes, at most {LABEL_LEN} fit", label.len()));
    }
    if label.contains('\0') {
        return Err("label contains a NUL byte".into());
    }
    Ok(())
}

impl SuperblockError {
    /// True when the copy is intact but written by a newer version or with features this build
    /// lacks: the volume must then be refused, never "repaired" from the other copy.
    pub fn is_unsupported(&self) -> bool {
        matches!(
            self,
            SuperblockError::Version { .. } | SuperblockError::Incompat(_) | SuperblockError::Profile { .. }
        )
    }
}

impl Superblock {
    /// The superblock of a new, clean volume of this build's version: no feature flags, no
    /// mirror set, no metadata device, the default error policy. `created` is in Unix seconds.
    pub fn new(
        geometry: Geometry,
        uuid: [u8; 16],
        profile: Profile,
        mode: Mode,
        label: &str,
        created: u64,
    ) -> Superblock {
        Superblock {
            version: FORMAT_VERSION,
            compat: 0,
            ro_compat: 0,
            incompat: profile_incompat(profile, geometry.tag_size) | mode.incompat(),
            uuid,
            profile,
            mode,
            geometry,
            created,
            mirror: None,
            meta_device: [0; 16],
            label: label.to_string(),
            state: VolumeState::Clean,
            error_policy: ErrorPolicy::Eio,
            key_check: [0; crate::tag::KEY_CHECK_SIZE],
            retag: None,
        }
    }

    /// Encodes copy `copy` (0 = primary, 1 = backup) into a 4 KiB region.
    pub fn encode(&self, copy: u8) -> Vec<u8> {
        let g = &self.geometry;
        let mut b = vec![0u8; usize_of(SB_REGION)];
        b[at::MAGIC..at::VERSION].copy_from_slice(&SB_MAGIC);
        b[at::VERSION..at::STRUCT_SIZE].copy_from_slice(&self.version.to_le_bytes());
        b[at::STRUCT_SIZE..at::COMPAT].copy_from_slice(&u32_of_small(SB_STRUCT_SIZE).to_le_bytes());
        b[at::COMPAT..at::RO_COMPAT].copy_from_slice(&self.compat.to_le_bytes());
        b[at::RO_COMPAT..at::INCOMPAT].copy_from_slice(&self.ro_compat.to_le_bytes());
        b[at::INCOMPAT..at::UUID].copy_from_slice(&self.incompat.to_le_bytes());
        b[at::UUID..at::BLOCK_SIZE].copy_from_slice(&self.uuid);
        b[at::BLOCK_SIZE..at::PROFILE].copy_from_slice(&g.block_size.to_le_bytes());
        b[at::PROFILE..at::TAG_SIZE].copy_from_slice(&self.profile.id().to_le_bytes());
        // The low 16 bits, the field's width: tag sizes are at most `MAX_TAG_SIZE`.
        b[at::TAG_SIZE..at::MODE].copy_from_slice(&g.tag_size.to_le_bytes()[..2]);
        b[at::MODE] = self.mode.id();
        b[at::COPY] = copy;
        b[at::META_PER_GROUP..at::GROUP_BLOCKS].copy_from_slice(&2u16.to_le_bytes());
        b[at::GROUP_BLOCKS..at::SIZE].copy_from_slice(&g.group_blocks.to_le_bytes());
        b[at::SIZE..at::DATA_BLOCKS].copy_from_slice(&g.size().to_le_bytes());
        b[at::DATA_BLOCKS..at::GROUPS].copy_from_slice(&g.data_blocks.to_le_bytes());
        b[at::GROUPS..at::FIRST_GROUP].copy_from_slice(&g.groups.to_le_bytes());
        b[at::FIRST_GROUP..at::BACKING_LEN].copy_from_slice(&g.first_group_offset.to_le_bytes());
        b[at::BACKING_LEN..at::BACKUP_SB].copy_from_slice(&g.backing_len.to_le_bytes());
        b[at::BACKUP_SB..at::CREATED].copy_from_slice(&g.backup_sb_offset.to_le_bytes());
        b[at::CREATED..at::MIRROR_SET].copy_from_slice(&self.created.to_le_bytes());
        if let Some(m) = &self.mirror {
            m.encode(&mut b);
        }
        b[at::STATE] = match self.state {
            VolumeState::Clean => 0,
            VolumeState::InUse => 1,
        };
        b[at::META_DEVICE..at::LABEL].copy_from_slice(&self.meta_device);
        let label = self.label.as_bytes();
        let n = label.len().min(LABEL_LEN);
        b[at::LABEL..at::LABEL + n].copy_from_slice(&label[..n]);
        b[at::ERROR_POLICY] = self.error_policy.id();
        b[at::KEY_CHECK..at::JOURNAL_LEN].copy_from_slice(&self.key_check);
        b[at::JOURNAL_LEN..at::RETAG_PROFILE].copy_from_slice(&g.journal_len.to_le_bytes());
        if let Some(r) = &self.retag {
            b[at::RETAG_PROFILE..at::RETAG_PADDING].copy_from_slice(&r.target.id().to_le_bytes());
            b[at::RETAG_CURSOR..at::RETAG_KEY_CHECK].copy_from_slice(&r.cursor.to_le_bytes());
            b[at::RETAG_KEY_CHECK..at::RESERVED].copy_from_slice(&r.key_check);
        }
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..SB_STRUCT_SIZE].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and validates one copy. `b` must hold at least [`SB_STRUCT_SIZE`] bytes.
    /// Returns the superblock and the copy index stored in it.
    pub fn decode(b: &[u8]) -> Result<(Superblock, u8), SuperblockError> {
        let (version, incompat) = decode_header(b)?;
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[at::UUID..at::BLOCK_SIZE]);
        let (profile, tag_slot, mode, copy) = decode_profile_mode_copy(b)?;
        let geometry = decode_geometry(b, tag_slot)?;
        check_mode_features(mode, incompat, &geometry)?;
        let meta_device = decode_meta_device(b, incompat)?;
        let mirror = if incompat & INCOMPAT_MIRROR == 0 {
            if !MirrorInfo::fields_zero(b) {
                return Err(field("mirror set", "set without the mirror feature flag".into()));
            }
            None
        } else {
            Some(MirrorInfo::decode(b)?)
        };
        let state = match b[at::STATE] {
            0 => VolumeState::Clean,
            1 => VolumeState::InUse,
            other => return Err(field("state", format!("unknown value {other}"))),
        };
        let label = decode_label(b)?;
        let error_policy = ErrorPolicy::from_id(b[at::ERROR_POLICY]).ok_or_else(|| {
            field(
                "error policy",
                format!(
                    "unknown value {} (0 = eio, 1 = read-only, 2 = continue)",
                    b[at::ERROR_POLICY]
                ),
            )
        })?;
        let key_check = decode_key_check(b, profile)?;
        let retag = decode_retag(b, incompat, profile, &geometry)?;
        let expected = tags_incompat(profile, geometry.tag_size, retag.as_ref());
        if incompat & (INCOMPAT_TAG_PROFILE | INCOMPAT_TAG_ROOM) != expected {
            return Err(field(
                "incompat",
                format!(
                    "the tag-profile and tag-room feature bits are {:#x} for tag profile {profile} \
                     in {}-byte tag slots (expected {expected:#x})",
                    incompat & (INCOMPAT_TAG_PROFILE | INCOMPAT_TAG_ROOM),
                    geometry.tag_size
                ),
            ));
        }
        Ok((
            Superblock {
                key_check,
                version,
                compat: le64(b, at::COMPAT),
                ro_compat: le64(b, at::RO_COMPAT),
                incompat,
                uuid,
                profile,
                mode,
                geometry,
                created: le64(b, at::CREATED),
                mirror,
                meta_device,
                label,
                state,
                error_policy,
                retag,
            },
            copy,
        ))
    }
}

/// A mode's feature bit is set exactly for it, and a journal exactly in `journal` mode.
fn check_mode_features(mode: Mode, incompat: u64, geometry: &Geometry) -> Result<(), SuperblockError> {
    let mode_bits = INCOMPAT_REBUILD | INCOMPAT_JOURNAL;
    if incompat & mode_bits != mode.incompat() {
        return Err(field(
            "mode",
            format!(
                "mode {} with the mode feature flags {:#x} (expected {:#x})",
                mode.name(),
                incompat & mode_bits,
                mode.incompat()
            ),
        ));
    }
    if (geometry.journal_len != 0) != (mode == Mode::Journal) {
        return Err(field(
            "journal length",
            format!("{} in mode {}", geometry.journal_len, mode.name()),
        ));
    }
    Ok(())
}

/// The checks that tell whether `b` is a superblock this build can read at all: length,
/// magic, checksum, version, structure size and incompatible features. Returns the version
/// and the incompat flags.
fn decode_header(b: &[u8]) -> Result<(u32, u64), SuperblockError> {
    if b.len() < SB_STRUCT_SIZE {
        return Err(field(
            "length",
            format!("{} bytes, need {SB_STRUCT_SIZE}", b.len()),
        ));
    }
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&b[at::MAGIC..at::VERSION]);
    if magic != SB_MAGIC {
        return Err(SuperblockError::BadMagic { found: magic });
    }
    let stored = le32(b, CRC_AT);
    let computed = crc32c::crc32c(&b[..CRC_AT]);
    if stored != computed {
        return Err(SuperblockError::BadChecksum { stored, computed });
    }
    let version = le32(b, at::VERSION);
    if version != FORMAT_VERSION {
        return Err(SuperblockError::Version { found: version });
    }
    if le32(b, at::STRUCT_SIZE) as usize != SB_STRUCT_SIZE {
        return Err(field("struct size", le32(b, at::STRUCT_SIZE).to_string()));
    }
    let incompat = le64(b, at::INCOMPAT);
    if incompat & !SUPPORTED_INCOMPAT != 0 {
        return Err(SuperblockError::Incompat(incompat & !SUPPORTED_INCOMPAT));
    }
    Ok((version, incompat))
}

/// The tag profile, the tag slot size (checked to hold the profile's tags), the consistency
/// mode and the copy index.
fn decode_profile_mode_copy(b: &[u8]) -> Result<(Profile, usize, Mode, u8), SuperblockError> {
    let profile = Profile::from_id(le16(b, at::PROFILE)).ok_or(SuperblockError::Profile {
        id: le16(b, at::PROFILE),
    })?;
    let tag_size = usize::from(le16(b, at::TAG_SIZE));
    if !TAG_SLOT_SIZES.contains(&tag_size) || tag_size < profile.tag_size() {
        return Err(field(
            "tag size",
            format!(
                "{tag_size}, profile {} needs slots of {} bytes or more (8, 16 or 32)",
                profile.name(),
                profile.tag_size()
            ),
        ));
    }
    let mode =
        Mode::from_id(b[at::MODE]).ok_or_else(|| field("mode", format!("unknown id {}", b[at::MODE])))?;
    let copy = b[at::COPY];
    if copy > 1 {
        return Err(field("copy index", copy.to_string()));
    }
    Ok((profile, tag_size, mode, copy))
}

/// The layout, rebuilt from the stored sizes and checked against the stored offsets.
fn decode_geometry(b: &[u8], tag_size: usize) -> Result<Geometry, SuperblockError> {
    if le16(b, at::META_PER_GROUP) != 2 {
        return Err(field(
            "metadata blocks per group",
            le16(b, at::META_PER_GROUP).to_string(),
        ));
    }
    let block_size = le32(b, at::BLOCK_SIZE);
    let group_blocks = le32(b, at::GROUP_BLOCKS);
    let size = le64(b, at::SIZE);
    let data_blocks = le64(b, at::DATA_BLOCKS);
    let backing_len = le64(b, at::BACKING_LEN);
    let journal_len = le64(b, at::JOURNAL_LEN);
    let geometry = Geometry::from_parts(block_size, tag_size, group_blocks, data_blocks, backing_len, journal_len)
        .ok_or_else(|| {
            field(
                "geometry",
                format!(
                    "block size {block_size}, {group_blocks} blocks per group, \
                     {data_blocks} data blocks and a {journal_len}-byte journal do not fit {backing_len} bytes"
                ),
            )
        })?;
    let checks = [
        ("volume size", size, geometry.size()),
        ("group count", le64(b, at::GROUPS), geometry.groups),
        (
            "first group offset",
            le64(b, at::FIRST_GROUP),
            geometry.first_group_offset,
        ),
        (
            "backup superblock offset",
            le64(b, at::BACKUP_SB),
            geometry.backup_sb_offset,
        ),
    ];
    for (name, stored, derived) in checks {
        if stored != derived {
            return Err(field(name, format!("{stored}, geometry implies {derived}")));
        }
    }
    Ok(geometry)
}

/// The key-check value: present (not all zero) exactly when the profile is keyed, and the
/// padding before it zero.
fn decode_key_check(b: &[u8], profile: Profile) -> Result<[u8; crate::tag::KEY_CHECK_SIZE], SuperblockError> {
    if b[at::PADDING2..at::KEY_CHECK].iter().any(|&x| x != 0) {
        return Err(field("padding after the error policy", "not zero".into()));
    }
    let mut check = [0u8; crate::tag::KEY_CHECK_SIZE];
    check.copy_from_slice(&b[at::KEY_CHECK..at::JOURNAL_LEN]);
    let present = check.iter().any(|&x| x != 0);
    if present != profile.is_keyed() {
        return Err(field(
            "key check",
            if present {
                format!("set, but tag profile {profile} takes no key")
            } else {
                format!("missing: tag profile {profile} is keyed")
            },
        ));
    }
    Ok(check)
}

/// The re-tag in progress: present exactly with [`INCOMPAT_RETAG`], to a known profile other
/// than the volume's whose tags fit its tag slots, with a cursor within the groups and a
/// key-check value (or seal) exactly for a keyed target or a keyed volume; without the bit,
/// bytes 336..384 are zero.
fn decode_retag(
    b: &[u8],
    incompat: u64,
    profile: Profile,
    geometry: &Geometry,
) -> Result<Option<Retag>, SuperblockError> {
    let id = le16(b, at::RETAG_PROFILE);
    if incompat & INCOMPAT_RETAG == 0 {
        if b[at::RETAG_PROFILE..at::RESERVED].iter().any(|&x| x != 0) {
            return Err(field("re-tag", "set without the re-tag feature flag".into()));
        }
        return Ok(None);
    }
    if b[at::RETAG_PADDING..at::RETAG_CURSOR].iter().any(|&x| x != 0) {
        return Err(field("re-tag padding", "not zero".into()));
    }
    let target = match id {
        0 => {
            return Err(field(
                "re-tag",
                "the re-tag feature flag without a target profile".into(),
            ))
        }
        id => Profile::from_id(id).ok_or(SuperblockError::Profile { id })?,
    };
    if target == profile || target.tag_size() > geometry.tag_size as usize {
        return Err(field(
            "re-tag",
            format!(
                "a re-tag from {profile} to {target} (the target must be another profile whose tags \
                 fit the volume's {}-byte tag slots)",
                geometry.tag_size
            ),
        ));
    }
    let cursor = le64(b, at::RETAG_CURSOR);
    if cursor > geometry.groups {
        return Err(field(
            "re-tag cursor",
            format!("{cursor}, the volume has {} groups", geometry.groups),
        ));
    }
    let mut key_check = [0u8; crate::tag::KEY_CHECK_SIZE];
    key_check.copy_from_slice(&b[at::RETAG_KEY_CHECK..at::RESERVED]);
    // A keyed target's key check, or the seal of a re-tag of a keyed volume to an unkeyed
    // profile.
    if key_check.iter().any(|&x| x != 0) != (target.is_keyed() || profile.is_keyed()) {
        return Err(field(
            "re-tag key check",
            format!("does not fit a re-tag from {profile} to {target}"),
        ));
    }
    Ok(Some(Retag {
        target,
        cursor,
        key_check,
    }))
}

/// The metadata device identity, which no feature uses yet: it must be zero.
fn decode_meta_device(b: &[u8], incompat: u64) -> Result<[u8; 16], SuperblockError> {
    let mut meta_device = [0u8; 16];
    meta_device.copy_from_slice(&b[at::META_DEVICE..at::LABEL]);
    match (meta_device == [0; 16], incompat & INCOMPAT_META_DEVICE != 0) {
        (false, false) => Err(field("metadata device", "set without a feature flag".into())),
        (true, true) => Err(field(
            "metadata device",
            "all zero with the metadata-device feature flag".into(),
        )),
        _ => Ok(meta_device),
    }
}

/// The label: UTF-8 up to the first zero byte, and only zeros after it.
fn decode_label(b: &[u8]) -> Result<String, SuperblockError> {
    let label_bytes = &b[at::LABEL..at::LABEL + LABEL_LEN];
    let end = label_bytes.iter().position(|&c| c == 0).unwrap_or(LABEL_LEN);
    if label_bytes[end..].iter().any(|&c| c != 0) {
        return Err(field("label", "bytes after the terminating zero".into()));
    }
    String::from_utf8(label_bytes[..end].to_vec()).map_err(|_| field("label", "not valid UTF-8".into()))
}

/// The incompat bits a volume of `profile` with tag slots of `tag_slot` bytes carries:
/// [`INCOMPAT_TAG_PROFILE`] for every profile but `crc32c`, [`INCOMPAT_TAG_ROOM`] when the
/// slots are wider than the profile's tags.
pub fn profile_incompat(profile: Profile, tag_slot: u32) -> u64 {
    let profile_bit = if profile == Profile::Crc32c {
        0
    } else {
        INCOMPAT_TAG_PROFILE
    };
    let room_bit = if tag_slot as usize == profile.tag_size() {
        0
    } else {
        INCOMPAT_TAG_ROOM
    };
    profile_bit | room_bit
}

/// The incompat bits of a volume with tag slots of `tag_slot` bytes and `retag`, if any: those
/// of [`profile_incompat`], with [`INCOMPAT_TAG_ROOM`] also when the re-tag's target has
/// tags of another size than the slots.
pub fn tags_incompat(profile: Profile, tag_slot: u32, retag: Option<&Retag>) -> u64 {
    let target_room = retag.is_some_and(|r| r.target.tag_size() != tag_slot as usize);
    profile_incompat(profile, tag_slot) | if target_room { INCOMPAT_TAG_ROOM } else { 0 }
}

/// The tag slot sizes a volume may have: the tag sizes of the profiles.
pub const TAG_SLOT_SIZES: [usize; 3] = [8, 16, 32];

/// The profile ids this build knows, as "1 = crc32c, 2 = xxh3, …".
fn known_profiles() -> String {
    Profile::ALL
        .iter()
        .map(|p| format!("{} = {}", p.id(), p.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Eight magic bytes as text where printable, and in hex.
fn show_magic(found: [u8; 8]) -> String {
    let text: String = found
        .iter()
        .map(|&b| if b.is_ascii_graphic() { b as char } else { '.' })
        .collect();
    let hex = found.iter().fold(String::new(), |mut hex, b| {
        // Writing to a `String` cannot fail.
        let _ = write!(hex, "{b:02x}");
        hex
    });
    format!("\"{text}\" = 0x{hex}")
}

/// What a user can do about a volume of another format version.
fn version_hint(found: u32) -> &'static str {
    if found == 1 {
        "; version 1 volumes were written by blockguard 0.1: copy the data out with that \
         release's `blockguard export VOLUME IMAGE` and `blockguard import IMAGE NEW-VOLUME` with this one"
    } else if found == 2 {
        "; version 2 volumes (one copy of the dirty-groups and first-write maps) were written by \
         development builds of blockguard 0.2: copy the data out with that build's \
         `blockguard export VOLUME IMAGE` and `blockguard import IMAGE NEW-VOLUME` with this one"
    } else if found == 3 {
        "; version 3 volumes (metadata sectors without a header check) were written by \
         development builds of blockguard 0.2: copy the data out with that build's \
         `blockguard export VOLUME IMAGE` and `blockguard import IMAGE NEW-VOLUME` with this one"
    } else if found > FORMAT_VERSION {
        "; it was written by a newer blockguard"
    } else {
        ""
    }
}

fn field(field: &'static str, detail: String) -> SuperblockError {
    SuperblockError::Field { field, detail }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            version: FORMAT_VERSION,
            compat: 0,
            ro_compat: 0,
            incompat: 0,
            uuid: [9; 16],
            profile: Profile::Crc32c,
            mode: Mode::Dual,
            geometry: Geometry::for_size(1 << 20, 4096, 8).unwrap(),
            created: 1,
            mirror: None,
            meta_device: [0; 16],
            label: "test".into(),
            state: VolumeState::InUse,
            error_policy: ErrorPolicy::ReadOnly,
            key_check: [0; 32],
            retag: None,
        }
    }

    /// `b` with its checksum made right again (a change a newer writer could have made).
    fn resealed(mut b: Vec<u8>) -> Vec<u8> {
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..SB_STRUCT_SIZE].copy_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn every_profile_round_trips_with_its_tag_size_and_key_check() {
        for profile in Profile::ALL {
            let t = profile.tag_size();
            let sb = Superblock {
                profile,
                geometry: Geometry::for_size(1 << 20, 4096, t).unwrap(),
                key_check: if profile.is_keyed() { [0xA5; 32] } else { [0; 32] },
                incompat: profile_incompat(profile, u32::try_from(t).unwrap()),
                ..sample()
            };
            let enc = sb.encode(0);
            assert_eq!(le16(&enc, at::PROFILE), profile.id());
            assert_eq!(usize::from(le16(&enc, at::TAG_SIZE)), t);
            assert_eq!(&enc[296..328], &sb.key_check);
            assert_eq!(Superblock::decode(&enc), Ok((sb.clone(), 0)), "{profile}");
            // The feature bit must match the profile.
            let flipped = Superblock {
                incompat: sb.incompat ^ INCOMPAT_TAG_PROFILE,
                ..sb.clone()
            };
            assert!(matches!(
                Superblock::decode(&flipped.encode(0)),
                Err(SuperblockError::Field {
                    field: "incompat",
                    ..
                })
            ));
            // The key check must be there exactly for keyed profiles.
            let mut wrong = enc.clone();
            wrong[300] ^= u8::from(!profile.is_keyed());
            if !profile.is_keyed() {
                assert!(matches!(
                    Superblock::decode(&resealed(wrong)),
                    Err(SuperblockError::Field {
                        field: "key check",
                        ..
                    })
                ));
            }
        }
        let keyed_without_check = Superblock {
            profile: Profile::Blake3Keyed,
            geometry: Geometry::for_size(1 << 20, 4096, 32).unwrap(),
            incompat: INCOMPAT_TAG_PROFILE,
            ..sample()
        };
        assert!(matches!(
            Superblock::decode(&keyed_without_check.encode(0)),
            Err(SuperblockError::Field {
                field: "key check",
                ..
            })
        ));
    }

    #[test]
    fn an_unknown_profile_is_refused_as_unsupported_naming_the_known_ones() {
        let mut b = sample().encode(0);
        b[at::PROFILE..at::PROFILE + 2].copy_from_slice(&99u16.to_le_bytes());
        let err = Superblock::decode(&resealed(b)).unwrap_err();
        assert_eq!(err, SuperblockError::Profile { id: 99 });
        assert!(err.is_unsupported());
        let text = err.to_string();
        assert!(
            text.contains("99") && text.contains("1 = crc32c") && text.contains("newer"),
            "{text}"
        );
        // A tag slot that is not a tag size, or too small for the profile, is damage.
        for (profile, slot) in [(Profile::Crc32c, 4), (Profile::Crc32c, 24), (Profile::Sha256, 8)] {
            let mut b = sample().encode(0);
            b[at::PROFILE..at::TAG_SIZE].copy_from_slice(&profile.id().to_le_bytes());
            b[at::TAG_SIZE] = slot;
            assert!(
                matches!(
                    Superblock::decode(&resealed(b)),
                    Err(SuperblockError::Field {
                        field: "tag size",
                        ..
                    })
                ),
                "{profile} in {slot}-byte slots"
            );
        }
    }

    /// A profile in wider tag slots than its tags (`--tag-room`): the layout follows the
    /// slots, the tag-room bit is set exactly then, and a re-tag may target any profile whose
    /// tags fit the slots.
    #[test]
    fn tag_room_lays_out_by_the_slot_and_carries_its_feature_bit() {
        let geometry = Geometry::for_size(1 << 20, 4096, 32).unwrap();
        assert_eq!(geometry.group_blocks, 120);
        let sb = Superblock {
            geometry,
            incompat: profile_incompat(Profile::Crc32c, 32),
            ..sample()
        };
        assert_eq!(sb.incompat, INCOMPAT_TAG_ROOM);
        let enc = sb.encode(0);
        assert_eq!(le16(&enc, at::TAG_SIZE), 32);
        assert_eq!(Superblock::decode(&enc), Ok((sb.clone(), 0)));
        // The bit without room, or room without the bit: refused.
        let mut b = enc.clone();
        b[at::INCOMPAT] &= !u8::try_from(INCOMPAT_TAG_ROOM).unwrap();
        assert!(Superblock::decode(&resealed(b)).is_err(), "room without the bit");
        let mut b = sample().encode(0);
        b[at::INCOMPAT] |= u8::try_from(INCOMPAT_TAG_ROOM).unwrap();
        assert!(Superblock::decode(&resealed(b)).is_err(), "the bit without room");
        // Any target that fits, keyed ones with their key check.
        for target in Profile::ALL.into_iter().filter(|&p| p != Profile::Crc32c) {
            let sb = Superblock {
                incompat: sb.incompat | INCOMPAT_RETAG,
                retag: Some(Retag {
                    target,
                    cursor: 2,
                    key_check: if target.is_keyed() { [7; 32] } else { [0; 32] },
                }),
                ..sb.clone()
            };
            assert_eq!(Superblock::decode(&sb.encode(1)), Ok((sb, 1)), "to {target}");
        }
        // In 16-byte slots a 32-byte target does not fit.
        let sb = Superblock {
            geometry: Geometry::for_size(1 << 20, 4096, 16).unwrap(),
            incompat: profile_incompat(Profile::Crc32c, 16) | INCOMPAT_RETAG,
            retag: Some(Retag {
                target: Profile::Blake3Keyed,
                cursor: 0,
                key_check: [7; 32],
            }),
            ..sample()
        };
        assert!(Superblock::decode(&sb.encode(0)).is_err());
    }

    /// A keyed volume re-tagged to an unkeyed profile records the re-tag's seal where a keyed
    /// target's key check goes: without one the record is refused as damage.
    #[test]
    fn a_retag_away_from_a_key_must_carry_a_seal() {
        let geometry = Geometry::for_size(1 << 20, 4096, 32).unwrap();
        let keyed = Superblock {
            profile: Profile::Blake3Keyed,
            geometry,
            key_check: [3; 32],
            // Crc32c's tags are narrower than the slots: the tag-room bit while the re-tag runs.
            incompat: profile_incompat(Profile::Blake3Keyed, 32) | INCOMPAT_TAG_ROOM | INCOMPAT_RETAG,
            retag: Some(Retag {
                target: Profile::Crc32c,
                cursor: 0,
                key_check: [5; 32],
            }),
            ..sample()
        };
        assert_eq!(Superblock::decode(&keyed.encode(0)), Ok((keyed.clone(), 0)));
        let unsealed = Superblock {
            retag: Some(Retag {
                target: Profile::Crc32c,
                cursor: 0,
                key_check: [0; 32],
            }),
            ..keyed
        };
        assert!(Superblock::decode(&unsealed.encode(0)).is_err());
    }

    #[test]
    fn roundtrip() {
        let sb = sample();
        for copy in [0, 1] {
            let (back, c) = Superblock::decode(&sb.encode(copy)).unwrap();
            assert_eq!(back, sb);
            assert_eq!(c, copy);
        }
    }

    #[test]
    fn every_single_byte_flip_is_rejected() {
        let enc = sample().encode(0);
        for i in 0..SB_STRUCT_SIZE {
            let mut b = enc.clone();
            b[i] ^= 0x10;
            assert!(Superblock::decode(&b).is_err(), "flip at {i} accepted");
        }
    }

    #[test]
    fn field_offsets_are_as_documented() {
        // The table of docs/FORMAT.md, "Superblock".
        let documented = [
            (at::MAGIC, 0),
            (at::VERSION, 8),
            (at::STRUCT_SIZE, 12),
            (at::COMPAT, 16),
            (at::RO_COMPAT, 24),
            (at::INCOMPAT, 32),
            (at::UUID, 40),
            (at::BLOCK_SIZE, 56),
            (at::PROFILE, 60),
            (at::TAG_SIZE, 62),
            (at::MODE, 64),
            (at::COPY, 65),
            (at::META_PER_GROUP, 66),
            (at::GROUP_BLOCKS, 68),
            (at::SIZE, 72),
            (at::DATA_BLOCKS, 80),
            (at::GROUPS, 88),
            (at::FIRST_GROUP, 96),
            (at::BACKING_LEN, 104),
            (at::BACKUP_SB, 112),
            (at::CREATED, 120),
            (at::MIRROR_SET, 128),
            (at::MIRROR_ROLE, 144),
            (at::STATE, 145),
            (at::PADDING, 146),
            (at::META_DEVICE, 148),
            (at::LABEL, 164),
            (at::MIRROR_MEMBERS, 228),
            (at::MIRROR_HEALTH, 229),
            (at::MIRROR_EVENT, 232),
            (at::MIRROR_IDS, 240),
            (at::ERROR_POLICY, 288),
            (at::PADDING2, 289),
            (at::KEY_CHECK, 296),
            (at::JOURNAL_LEN, 328),
            (at::RETAG_PROFILE, 336),
            (at::RETAG_PADDING, 338),
            (at::RETAG_CURSOR, 344),
            (at::RETAG_KEY_CHECK, 352),
            (at::RESERVED, 384),
            (at::CHECKSUM, 508),
        ];
        for (i, (got, want)) in documented.iter().enumerate() {
            assert_eq!(got, want, "field {i} of the table");
        }
    }

    /// A re-tag in progress round-trips with its feature bit, and every inconsistency is
    /// refused: the bit without a target or a target without the bit, the volume's own profile
    /// or one of another tag size, a cursor past the groups, a key check that does not fit.
    #[test]
    fn a_retag_in_progress_round_trips_and_inconsistent_ones_are_refused() {
        let geometry = Geometry::for_size(1 << 20, 4096, 8).unwrap();
        let sb = Superblock {
            incompat: INCOMPAT_RETAG,
            retag: Some(Retag {
                target: Profile::Xxh3,
                cursor: 1,
                key_check: [0; 32],
            }),
            ..sample()
        };
        let enc = sb.encode(0);
        assert_eq!(le16(&enc, 336), Profile::Xxh3.id());
        assert_eq!(le64(&enc, 344), 1);
        assert_eq!(Superblock::decode(&enc), Ok((sb.clone(), 0)));
        let refused = |b: Vec<u8>, what: &str| {
            let r = Superblock::decode(&resealed(b));
            assert!(r.is_err(), "{what}: accepted");
        };
        let mut b = enc.clone();
        b[at::INCOMPAT] &= !u8::try_from(INCOMPAT_RETAG).unwrap();
        refused(b, "target without the bit");
        let mut b = sample().encode(0);
        b[at::INCOMPAT] |= u8::try_from(INCOMPAT_RETAG).unwrap();
        refused(b, "bit without a target");
        for (target, what) in [(Profile::Crc32c, "own profile"), (Profile::Sha256, "larger tags")] {
            let mut b = enc.clone();
            b[336..338].copy_from_slice(&target.id().to_le_bytes());
            refused(b, what);
        }
        let mut b = enc.clone();
        b[344..352].copy_from_slice(&(geometry.groups + 1).to_le_bytes());
        refused(b, "cursor past the groups");
        let mut b = enc.clone();
        b[360] = 1;
        refused(b, "key check for an unkeyed target");
        let mut b = enc.clone();
        b[340] = 1;
        refused(b, "padding");
        // An unknown target id is unsupported (a newer build), like an unknown profile.
        let mut b = enc;
        b[336..338].copy_from_slice(&99u16.to_le_bytes());
        assert!(Superblock::decode(&resealed(b)).unwrap_err().is_unsupported());
    }

    #[test]
    fn every_error_policy_round_trips_and_unknown_ones_are_refused() {
        for policy in ErrorPolicy::ALL {
            let sb = Superblock {
                error_policy: policy,
                ..sample()
            };
            let enc = sb.encode(0);
            assert_eq!(enc[288], policy.id(), "{policy:?} at byte 288");
            assert_eq!(Superblock::decode(&enc), Ok((sb, 0)));
            assert_eq!(ErrorPolicy::from_name(policy.name()), Some(policy));
        }
        // A volume of a build without the policy: byte 288 zero, read as `eio`.
        let default = Superblock::new(
            Geometry::for_size(1 << 20, 4096, 8).unwrap(),
            [1; 16],
            Profile::Crc32c,
            Mode::Dual,
            "",
            1,
        );
        assert_eq!(default.error_policy, ErrorPolicy::Eio);
        assert_eq!(default.encode(0)[at::ERROR_POLICY], 0);
        // An unknown value with a valid checksum: refused as an invalid field (damage).
        let mut b = sample().encode(0);
        b[at::ERROR_POLICY] = 3;
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..SB_STRUCT_SIZE].copy_from_slice(&crc.to_le_bytes());
        match Superblock::decode(&b) {
            Err(SuperblockError::Field { field, detail }) => {
                assert_eq!(field, "error policy");
                assert!(detail.contains("unknown value 3"), "{detail}");
            }
            other => panic!("an unknown error policy was accepted: {other:?}"),
        }
        assert_eq!(ErrorPolicy::from_name("panic"), None);
    }

    #[test]
    fn a_mirror_member_round_trips_and_needs_its_feature_bit() {
        let mut sb = sample();
        sb.incompat = INCOMPAT_MIRROR;
        sb.mirror = Some(MirrorInfo {
            set: [9; 16],
            role: 2,
            members: (1..=3)
                .map(|i| super::super::MemberInfo {
                    id: [i; 16],
                    in_sync: i != 2,
                    full_copy: false,
                })
                .collect(),
            event: 7,
        });
        for copy in 0..2 {
            assert_eq!(Superblock::decode(&sb.encode(copy)), Ok((sb.clone(), copy)));
        }
        // The fields without the bit, or the bit without the fields: refused as damage.
        let mut no_bit = sb.clone();
        no_bit.incompat = 0;
        assert!(matches!(
            Superblock::decode(&no_bit.encode(0)),
            Err(SuperblockError::Field { .. })
        ));
        let mut no_fields = sb;
        no_fields.mirror = None;
        assert!(matches!(
            Superblock::decode(&no_fields.encode(0)),
            Err(SuperblockError::Field { .. })
        ));
    }

    #[test]
    fn newer_version_and_unknown_incompat_are_refused() {
        let mut sb = sample();
        sb.version = FORMAT_VERSION + 1;
        let err = Superblock::decode(&sb.encode(0)).unwrap_err();
        assert_eq!(
            err,
            SuperblockError::Version {
                found: FORMAT_VERSION + 1
            }
        );
        assert!(err.to_string().contains("newer blockguard"), "{err}");
        let mut sb = sample();
        sb.version = 1;
        let err = Superblock::decode(&sb.encode(0)).unwrap_err();
        assert!(err.is_unsupported());
        assert!(
            err.to_string().contains("blockguard 0.1") && err.to_string().contains("import"),
            "a v1 volume gets the way out: {err}"
        );
        let mut sb = sample();
        // The first bit this build does not know (bit 5 is the re-tag's, 6 the tag room's).
        sb.incompat = 1 << 7;
        assert!(matches!(
            Superblock::decode(&sb.encode(0)),
            Err(SuperblockError::Incompat(_))
        ));
        assert!(matches!(
            Superblock::decode(&[0u8; 512]),
            Err(SuperblockError::BadMagic { .. })
        ));
        assert!(Superblock::decode(&[0u8; 10]).is_err());
    }
}

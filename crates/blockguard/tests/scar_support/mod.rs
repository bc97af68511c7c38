//! Helpers shared by the outside reviews of scarred metadata sectors (`review_scars.rs`,
//! `review_scars2.rs`) and of the torn tag (`review_torn.rs`, `review_torn2.rs`): volumes of
//! two versions, their layout, crash images, torn writes on mirror sets.
#![allow(dead_code)] // Each review uses its own subset.

use blockguard::blockguard_backend::{Backend, Event, FaultBackend, MemoryBackend};
use blockguard::tag::TagKey;
use blockguard::{CorruptionKind, Error, FormatOptions, Mode, OpenOptions, Profile, ScrubOptions, Volume};
use std::sync::Arc;
use std::time::Duration;

pub const BS: usize = 4096;
/// Four groups of blocks (as many as a metadata block holds for the profile) at most.
pub const SIZE: u64 = 4 * 496 * 4096;

pub fn key() -> TagKey {
    TagKey::from_bytes(&[0x5c; 32]).unwrap()
}

pub fn format_opts(mode: Mode, profile: Profile) -> FormatOptions {
    let mut f = FormatOptions::with_size(SIZE);
    f.mode = mode;
    f.profile = profile;
    f.key = profile.is_keyed().then(key);
    if mode == Mode::Journal {
        f.journal_size = Some(1 << 20);
    }
    f
}

/// Commits on the writing thread, a small stage: deterministic backend I/O.
pub fn sync_opts(profile: Profile) -> OpenOptions {
    OpenOptions {
        background_commit: false,
        stage_bytes: 3 * BS,
        dirty_clear_interval: Duration::from_secs(3600),
        key: profile.is_keyed().then(key),
        ..OpenOptions::default()
    }
}

pub fn ro_opts(profile: Profile) -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..sync_opts(profile)
    }
}

pub fn pattern(block: u64, version: u32) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    for (i, x) in b.iter_mut().enumerate() {
        *x = (block as u8) ^ (version as u8).wrapping_mul(31) ^ (i as u8).wrapping_mul(7) ^ 0x5a;
    }
    b[..8].copy_from_slice(&block.to_le_bytes());
    b[8..12].copy_from_slice(&version.to_le_bytes());
    b
}

pub fn read_block(vol: &Volume, block: u64) -> blockguard::Result<Vec<u8>> {
    let mut b = vec![0u8; BS];
    vol.read_at(&mut b, block * BS as u64)?;
    Ok(b)
}

pub fn write_block(vol: &Volume, block: u64, version: u32) {
    vol.write_at(&pattern(block, version), block * BS as u64).unwrap();
}

pub fn corrupt_kind(e: &Error) -> Option<CorruptionKind> {
    match e {
        Error::Corrupt { kind, .. } => Some(*kind),
        _ => None,
    }
}

/// Where things are on the backend, for a volume's geometry.
pub struct Layout {
    pub meta: [u64; 2],
    pub tag_size: usize,
    pub per: usize,
}

impl Layout {
    pub fn of(vol: &Volume, group: u64) -> Layout {
        let geo = vol.geometry();
        Layout {
            meta: [geo.meta_offset(group, 0), geo.meta_offset(group, 1)],
            tag_size: geo.tag_size as usize,
            per: geo.tags_per_sector() as usize,
        }
    }
    pub fn sector(&self, slot: usize, k: usize) -> usize {
        (self.meta[slot] + 512 * k as u64) as usize
    }
    pub fn tag(&self, slot: usize, k: usize, j: usize) -> usize {
        self.sector(slot, k) + 16 + j * self.tag_size
    }
    pub fn generation(&self, img: &[u8], slot: usize, k: usize) -> u64 {
        let at = self.sector(slot, k) + 8;
        u64::from_le_bytes(img[at..at + 8].try_into().unwrap())
    }
    /// The slot holding pair `k`'s newest sector, by the raw generations (both written).
    pub fn newest(&self, img: &[u8], k: usize) -> usize {
        usize::from(self.generation(img, 1, k) > self.generation(img, 0, k))
    }
}

pub fn data_at(vol: &Volume, block: u64) -> usize {
    vol.geometry().data_offset(block) as usize
}

pub fn scrub(vol: &Volume, repair: bool) -> blockguard::ScrubReport {
    vol.scrub(
        ScrubOptions {
            repair,
            ..ScrubOptions::default()
        },
        &mut |_| {},
    )
    .unwrap()
}

/// Opens an image on a fresh memory backend.
pub fn open_image(img: Vec<u8>, opts: &OpenOptions) -> (Arc<MemoryBackend>, blockguard::Result<Volume>) {
    let mb = Arc::new(MemoryBackend::from_vec(img));
    let vol = Volume::open(mb.clone(), opts);
    (mb, vol)
}

/// A clean volume whose pair 0 of group 0 holds `v1` for every block, then `v2` for `changed`
/// (each version flushed and closed). Returns the image.
pub fn two_versions(mode: Mode, profile: Profile, changed: &[u64]) -> Vec<u8> {
    let f = format_opts(mode, profile);
    let mb = Arc::new(MemoryBackend::new(f.backing_len().unwrap()).unwrap());
    Volume::format(mb.clone(), &f).unwrap().close().unwrap();
    let vol = Volume::open(mb.clone(), &sync_opts(profile)).unwrap();
    let per = Layout::of(&vol, 0).per as u64;
    for b in 0..per {
        write_block(&vol, b, 1);
    }
    vol.flush().unwrap();
    vol.close().unwrap();
    let vol = Volume::open(mb.clone(), &sync_opts(profile)).unwrap();
    for &b in changed {
        write_block(&vol, b, 2);
    }
    vol.flush().unwrap();
    vol.close().unwrap();
    mb.snapshot()
}

pub const PROFILES: [Profile; 3] = [Profile::Crc32c, Profile::NvmePi64, Profile::HmacSha256];

/// The members of a set as the library takes them.
pub fn dyns<B: Backend + 'static>(v: &[Arc<B>]) -> Vec<Arc<dyn Backend>> {
    v.iter().map(|b| b.clone() as Arc<dyn Backend>).collect()
}

/// Writes `data` to block 0 of the set and flushes, each member's data write torn with its
/// mask (all false: it never landed); returns each member's disk right after its torn write.
pub fn mirror_torn_write(
    fbs: &[Arc<FaultBackend>],
    vol: &Volume,
    data: &[u8],
    masks: &[Vec<bool>],
) -> Vec<Vec<u8>> {
    let at = vol.geometry().data_offset(0);
    let starts: Vec<usize> = fbs.iter().map(|fb| fb.events().len()).collect();
    for (fb, m) in fbs.iter().zip(masks) {
        let m = m.clone();
        fb.tear_writes_with(move |off, l| (off == at && l == BS).then(|| m.clone()));
    }
    vol.write_at(data, 0).unwrap();
    vol.flush().unwrap();
    fbs.iter()
        .zip(starts)
        .map(|(fb, start)| {
            fb.clear_faults();
            let ev = fb.events();
            let torn = (start..ev.len())
                .find(|&i| matches!(&ev[i], Event::TornWrite { offset, .. } if *offset == at))
                .expect("torn");
            let mut end = torn + 1;
            while end < ev.len()
                && matches!(&ev[end], Event::Write { write, .. } if write.offset >= at && write.end() <= at + BS as u64)
            {
                end += 1;
            }
            let st = fb.state_at(end);
            let all: Vec<usize> = (0..st.unflushed().len()).collect();
            st.crash_image(&all)
        })
        .collect()
}

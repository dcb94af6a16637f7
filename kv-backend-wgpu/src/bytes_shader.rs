//! The WGSL kernels of byte tables (`crate::bytes`), and the structs and constants they
//! share with the host, each defined once here in Rust and emitted into the module.
//!
//! # Layout
//!
//! - The *index* is open addressing with linear probing over `slots` (a power of two)
//!   slots: `tkl[s]`, the key's length, is the slot's state (`KL_EMPTY = 0`: never used,
//!   `KL_TOMB`: deleted, else occupied, as every key has 1 to 512 bytes); `tslot[s]` holds
//!   the rest of the entry ([`Slot`]: the value's length, the key's hash, the record's
//!   address in the arena, the expiry time). A zeroed index is empty.
//! - The *arena* is one array of u32 words; a record (key bytes then value bytes) starts
//!   at an 8-byte boundary (`kv_arena::RECORD_ALIGN`) that the host planned.
//! - The batch: `bq` (u32 words: the keys of the items, each from a word boundary and
//!   zero-padded; or a bitmap of segments; or gathered values), `bitem` ([`Item`] per
//!   item), `bout` ([`Found`] per item or per appended entry), `bpiece` ([`Piece`] per
//!   copy), and `ctl`, the counters.
//!
//! # Kernels
//!
//! - `kb_find`: each item probes from its home slot for an occupied slot with its length
//!   and hash whose key in the arena is byte for byte its own, and writes what it found.
//! - `kb_claim`: each item (a key the batch found absent; the batch's keys are distinct)
//!   claims the first empty or deleted slot of its probe with a compare-exchange of its
//!   key length, then writes the entry.
//! - `kb_set`: writes fields of given slots (an overwrite, a new expiry time, a deletion,
//!   a record moved by compaction).
//! - `kb_scan`: one invocation per slot of a range appends the entries that expired (and
//!   deletes them) or whose records lie in the segments of a bitmap.
//! - `kb_copy`: copies pieces of at most [`COPY_WORDS`] words from the arena to `bq` (a
//!   get's values) or within the arena (compaction).
//!
//! # Bounded loops
//!
//! A probe stops after `p.budget` units of work per dispatch (a slot, or a word of a
//! key compared); an item that has not decided keeps how far it got in `Item::steps` and
//! runs again in the next dispatch (counting itself in `ctl[C_PROGRESS]` when its probe
//! moved on), while a decided one sets `steps = DONE` and counts itself in
//! `ctl[C_FINISHED]`. The host dispatches again until every item has counted itself, and
//! fails a batch whose submission neither decided an item nor moved a probe on. An item decides only on what it saw whole: a key comparison cut short (a
//! driver that ends a loop early) is neither equal nor different, and the slot is probed
//! again. Copies are at most [`COPY_WORDS`] words, and a piece counts itself only once all
//! of its words were copied.

use std::fmt::Write as _;

use bytemuck::{Pod, Zeroable};

/// Defines a struct of u32 fields for the host (`#[repr(C)]`, `Pod`) and its WGSL
/// declaration (`WGSL`), from one list of fields.
macro_rules! gpu_struct {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $f:ident),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
        pub(crate) struct $name {
            $($(#[$fm])* pub $f: u32,)*
        }

        impl $name {
            /// The struct's WGSL declaration.
            pub(crate) const WGSL: &'static str = concat!(
                "struct ", stringify!($name), " {", $(" ", stringify!($f), ": u32,",)* " }\n"
            );
        }
    };
}

gpu_struct! {
    /// Kernel parameters (the uniform binding), u64 values as halves.
    Params {
        /// Items, pieces, or slots of the range (`kb_scan`).
        n,
        /// Slots of the index less one.
        smask,
        /// Units of probe work per item per dispatch.
        budget,
        /// The kernel's mode (`SET_*`, `SCAN_*`, `COPY_*`).
        mode,
        /// `kb_scan`: the first slot of the range.
        base,
        /// `kb_scan`: the entries `bout` holds.
        cap,
        /// `kb_scan`: log2 of the arena's segment size.
        seg_shift,
        pad0,
        /// Now, on the table's clock.
        now_lo,
        now_hi,
        pad1,
        pad2,
    }
}

gpu_struct! {
    /// What a slot holds besides its key length (`tkl`).
    Slot {
        vlen,
        hash_lo,
        hash_hi,
        addr_lo,
        addr_hi,
        exp_lo,
        exp_hi,
        pad,
    }
}

gpu_struct! {
    /// An item of a batch: what `kb_find`, `kb_claim` and `kb_set` take.
    Item {
        /// The home slot (`kb_find`, `kb_claim`), or the slot to write (`kb_set`).
        home,
        /// `kb_find`: the word of `bq` where the key starts.
        koff,
        klen,
        vlen,
        hash_lo,
        hash_hi,
        addr_lo,
        addr_hi,
        exp_lo,
        exp_hi,
        /// Slots probed so far from the home slot; `DONE` once decided.
        steps,
        pad,
    }
}

gpu_struct! {
    /// An entry as a kernel found it: `kb_find`'s answer per item (`slot1 = 0`: absent),
    /// `kb_scan`'s per appended entry.
    Found {
        /// The slot plus one; 0 for none.
        slot1,
        klen,
        vlen,
        pad,
        addr_lo,
        addr_hi,
        exp_lo,
        exp_hi,
    }
}

gpu_struct! {
    /// A copy of `nw` words (at most [`COPY_WORDS`]) from arena word `src` to word `dst` of
    /// `bq` or of the arena.
    Piece {
        src,
        dst,
        nw,
        pad,
    }
}

impl Item {
    /// An item of slot (or home slot) `slot`, all else zero.
    pub(crate) fn at(slot: u32) -> Item {
        Item {
            home: slot,
            ..Item::default()
        }
    }

    /// The item with record address `addr`.
    pub(crate) fn addr(self, addr: u64) -> Item {
        let (addr_lo, addr_hi) = split(addr);
        Item {
            addr_lo,
            addr_hi,
            ..self
        }
    }

    /// The item with expiry time `expires`.
    pub(crate) fn expires(self, expires: u64) -> Item {
        let (exp_lo, exp_hi) = split(expires);
        Item {
            exp_lo,
            exp_hi,
            ..self
        }
    }
}

impl Piece {
    /// Appends the pieces of a copy of `words` words from `src` to `dst` to `out`.
    pub(crate) fn cut(src: u32, dst: u32, words: u32, out: &mut Vec<Piece>) {
        out.extend((0..words).step_by(COPY_WORDS as usize).map(|k| Piece {
            src: src + k,
            dst: dst + k,
            nw: COPY_WORDS.min(words - k),
            pad: 0,
        }));
    }
}

impl Found {
    /// The slot, if any.
    pub(crate) fn slot(&self) -> Option<u32> {
        self.slot1.checked_sub(1)
    }

    /// The record's address in the arena.
    pub(crate) fn addr(&self) -> u64 {
        join(self.addr_lo, self.addr_hi)
    }

    /// The expiry time (0: never).
    pub(crate) fn expires(&self) -> u64 {
        join(self.exp_lo, self.exp_hi)
    }
}

/// A u64 from its halves.
pub(crate) fn join(lo: u32, hi: u32) -> u64 {
    (u64::from(hi) << 32) | u64::from(lo)
}

/// A u64's halves.
pub(crate) fn split(v: u64) -> (u32, u32) {
    (v as u32, (v >> 32) as u32)
}

/// The key length of a slot never used.
pub(crate) const KL_EMPTY: u32 = 0;
/// The key length of a deleted slot.
pub(crate) const KL_TOMB: u32 = u32::MAX;
/// `Item::steps` of an item that decided.
pub(crate) const DONE: u32 = u32::MAX;
/// The most words one invocation of `kb_copy` copies.
pub(crate) const COPY_WORDS: u32 = 256;

/// The counters in `ctl`.
pub(crate) mod counter {
    /// Items (or pieces) that finished in the submission.
    pub(crate) const FINISHED: usize = 0;
    /// Entries `kb_scan` appended.
    pub(crate) const APPENDED: usize = 1;
    /// Deleted slots `kb_claim` reused.
    pub(crate) const REUSED: usize = 2;
    /// Items that found no slot at all (an index with no free slot: never after admission).
    pub(crate) const ERRORS: usize = 3;
    /// Undecided items whose probe moved on in the submission.
    pub(crate) const PROGRESS: usize = 4;
    /// Counters.
    pub(crate) const LEN: usize = 5;
}

/// Modes of `kb_set`.
pub(crate) mod set {
    /// An overwrite: the value's length, the record's address, the expiry time.
    pub(crate) const PUT: u32 = 0;
    /// A new expiry time.
    pub(crate) const EXPIRE: u32 = 1;
    /// A deletion: the slot becomes deleted.
    pub(crate) const DELETE: u32 = 2;
    /// A record moved: its address.
    pub(crate) const MOVE: u32 = 3;
}

/// Modes of `kb_scan`.
pub(crate) mod scan {
    /// Entries expired at `now`, which are deleted.
    pub(crate) const EXPIRED: u32 = 0;
    /// Entries whose records lie in a segment of the bitmap in `bq`.
    pub(crate) const SEGMENTS: u32 = 1;
}

/// Modes of `kb_copy`.
pub(crate) mod copy {
    /// From the arena to `bq`.
    pub(crate) const GATHER: u32 = 0;
    /// Within the arena (source and destination do not overlap).
    pub(crate) const MOVE: u32 = 1;
}

/// Storage bindings after the parameters.
pub(crate) const STORAGE: u32 = 8;

/// The kernels' entry points.
pub(crate) const FIND: &str = "kb_find";
pub(crate) const CLAIM: &str = "kb_claim";
pub(crate) const SET: &str = "kb_set";
pub(crate) const SCAN: &str = "kb_scan";
pub(crate) const COPY: &str = "kb_copy";
pub(crate) const ENTRIES: [&str; 5] = [FIND, CLAIM, SET, SCAN, COPY];

fn constants() -> String {
    let mut out = String::new();
    let u32s = [
        ("WG", kv_kernels::layout::WORKGROUP),
        ("KL_EMPTY", KL_EMPTY),
        ("KL_TOMB", KL_TOMB),
        ("DONE", DONE),
        ("COPY_WORDS", COPY_WORDS),
        ("C_FINISHED", counter::FINISHED as u32),
        ("C_APPENDED", counter::APPENDED as u32),
        ("C_REUSED", counter::REUSED as u32),
        ("C_ERRORS", counter::ERRORS as u32),
        ("C_PROGRESS", counter::PROGRESS as u32),
        ("SET_PUT", set::PUT),
        ("SET_EXPIRE", set::EXPIRE),
        ("SET_DELETE", set::DELETE),
        ("SET_MOVE", set::MOVE),
        ("SCAN_EXPIRED", scan::EXPIRED),
        ("SCAN_SEGMENTS", scan::SEGMENTS),
        ("COPY_GATHER", copy::GATHER),
        ("COPY_MOVE", copy::MOVE),
    ];
    for (name, v) in u32s {
        let _ = writeln!(out, "const {name}: u32 = {v}u;");
    }
    for decl in [
        Params::WGSL,
        Slot::WGSL,
        Item::WGSL,
        Found::WGSL,
        Piece::WGSL,
    ] {
        out.push_str(decl);
    }
    out.push_str(crate::shader::EXPIRED_WGSL);
    out
}

/// The byte-table module (see the module docs).
pub(crate) fn module() -> String {
    let mut s = constants();
    s.push_str(SRC);
    s
}

const SRC: &str = r#"
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> ctl: array<atomic<u32>>;
@group(0) @binding(2) var<storage, read_write> tkl: array<atomic<u32>>;
@group(0) @binding(3) var<storage, read_write> tslot: array<Slot>;
@group(0) @binding(4) var<storage, read_write> arena: array<u32>;
@group(0) @binding(5) var<storage, read_write> bq: array<u32>;
@group(0) @binding(6) var<storage, read_write> bitem: array<Item>;
@group(0) @binding(7) var<storage, read_write> bout: array<Found>;
@group(0) @binding(8) var<storage, read_write> bpiece: array<Piece>;

const NONE: u32 = 0xffffffffu;
const CMP_DIFFER: u32 = 0u;
const CMP_EQUAL: u32 = 1u;
const CMP_CUT: u32 = 2u;

fn index_of(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid;
}

fn join(lo: u32, hi: u32) -> u64 { return (u64(hi) << 32u) | u64(lo); }

fn now() -> u64 { return join(p.now_lo, p.now_hi); }

// The key of klen bytes at bq[koff..] against the key at arena byte address addr (a
// multiple of 8): CMP_DIFFER, CMP_EQUAL, or CMP_CUT when the loop ended before deciding.
fn compare(koff: u32, klen: u32, addr: u64) -> u32 {
    let aw = u32(addr >> 2u);
    let nw = (klen + 3u) / 4u;
    let tail = klen & 3u;
    var k = 0u;
    for (; k < nw; k += 1u) {
        var a = arena[aw + k];
        if k + 1u == nw && tail != 0u {
            a &= (1u << (tail * 8u)) - 1u;
        }
        if a != bq[koff + k] {
            return CMP_DIFFER;
        }
    }
    if k == nw {
        return CMP_EQUAL;
    }
    return CMP_CUT;
}

fn found_of(s: u32, klen: u32) -> Found {
    let e = tslot[s];
    var o: Found;
    o.slot1 = s + 1u;
    o.klen = klen;
    o.vlen = e.vlen;
    o.addr_lo = e.addr_lo;
    o.addr_hi = e.addr_hi;
    o.exp_lo = e.exp_lo;
    o.exp_hi = e.exp_hi;
    return o;
}

@compute @workgroup_size(WG)
fn kb_find(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = index_of(wid, nwg, lid);
    if i >= p.n { return; }
    let it = bitem[i];
    if it.steps == DONE { return; }
    var steps = it.steps;
    var work = 0u;
    var decided = false;
    var hit = NONE;
    let nw = (it.klen + 3u) / 4u;
    loop {
        if work >= p.budget { break; }
        if steps > p.smask { decided = true; break; }
        let s = (it.home + steps) & p.smask;
        let kl = atomicLoad(&tkl[s]);
        if kl == KL_EMPTY { decided = true; break; }
        if kl == it.klen {
            let e = tslot[s];
            if e.hash_lo == it.hash_lo && e.hash_hi == it.hash_hi {
                let c = compare(it.koff, it.klen, join(e.addr_lo, e.addr_hi));
                work += nw;
                if c == CMP_CUT { break; }
                if c == CMP_EQUAL { hit = s; decided = true; break; }
            }
        }
        steps += 1u;
        work += 1u;
    }
    if decided {
        var o: Found;
        if hit != NONE { o = found_of(hit, it.klen); }
        bout[i] = o;
        bitem[i].steps = DONE;
        atomicAdd(&ctl[C_FINISHED], 1u);
    } else {
        bitem[i].steps = steps;
        if steps != it.steps { atomicAdd(&ctl[C_PROGRESS], 1u); }
    }
}

@compute @workgroup_size(WG)
fn kb_claim(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = index_of(wid, nwg, lid);
    if i >= p.n { return; }
    let it = bitem[i];
    if it.steps == DONE { return; }
    var steps = it.steps;
    var work = 0u;
    var decided = false;
    loop {
        if work >= p.budget { break; }
        work += 1u;
        if steps > p.smask {
            atomicAdd(&ctl[C_ERRORS], 1u);
            decided = true;
            break;
        }
        let s = (it.home + steps) & p.smask;
        let kl = atomicLoad(&tkl[s]);
        if kl == KL_EMPTY || kl == KL_TOMB {
            let r = atomicCompareExchangeWeak(&tkl[s], kl, it.klen);
            if r.exchanged {
                var e: Slot;
                e.vlen = it.vlen;
                e.hash_lo = it.hash_lo;
                e.hash_hi = it.hash_hi;
                e.addr_lo = it.addr_lo;
                e.addr_hi = it.addr_hi;
                e.exp_lo = it.exp_lo;
                e.exp_hi = it.exp_hi;
                tslot[s] = e;
                if kl == KL_TOMB { atomicAdd(&ctl[C_REUSED], 1u); }
                decided = true;
                break;
            }
            // A weak exchange may fail spuriously: the slot is tried again.
            if r.old_value == kl { continue; }
        }
        steps += 1u;
    }
    if decided {
        bitem[i].steps = DONE;
        atomicAdd(&ctl[C_FINISHED], 1u);
    } else {
        bitem[i].steps = steps;
        if steps != it.steps { atomicAdd(&ctl[C_PROGRESS], 1u); }
    }
}

@compute @workgroup_size(WG)
fn kb_set(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = index_of(wid, nwg, lid);
    if i >= p.n { return; }
    let it = bitem[i];
    let s = it.home;
    if p.mode == SET_DELETE {
        atomicStore(&tkl[s], KL_TOMB);
    } else if p.mode == SET_PUT {
        tslot[s].vlen = it.vlen;
        tslot[s].addr_lo = it.addr_lo;
        tslot[s].addr_hi = it.addr_hi;
        tslot[s].exp_lo = it.exp_lo;
        tslot[s].exp_hi = it.exp_hi;
    } else if p.mode == SET_EXPIRE {
        tslot[s].exp_lo = it.exp_lo;
        tslot[s].exp_hi = it.exp_hi;
    } else if p.mode == SET_MOVE {
        tslot[s].addr_lo = it.addr_lo;
        tslot[s].addr_hi = it.addr_hi;
    }
    atomicAdd(&ctl[C_FINISHED], 1u);
}

@compute @workgroup_size(WG)
fn kb_scan(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let j = index_of(wid, nwg, lid);
    if j >= p.n { return; }
    let s = p.base + j;
    let kl = atomicLoad(&tkl[s]);
    if kl == KL_EMPTY || kl == KL_TOMB { return; }
    let e = tslot[s];
    var take = false;
    if p.mode == SCAN_EXPIRED {
        take = expired_at(join(e.exp_lo, e.exp_hi), now());
        if take { atomicStore(&tkl[s], KL_TOMB); }
    } else {
        let seg = u32(join(e.addr_lo, e.addr_hi) >> p.seg_shift);
        take = ((bq[seg >> 5u] >> (seg & 31u)) & 1u) != 0u;
    }
    if take {
        let k = atomicAdd(&ctl[C_APPENDED], 1u);
        if k < p.cap { bout[k] = found_of(s, kl); }
    }
}

@compute @workgroup_size(WG)
fn kb_copy(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = index_of(wid, nwg, lid);
    if i >= p.n { return; }
    let pc = bpiece[i];
    let nw = min(pc.nw, COPY_WORDS);
    var k = 0u;
    if p.mode == COPY_GATHER {
        for (; k < nw; k += 1u) { bq[pc.dst + k] = arena[pc.src + k]; }
    } else {
        for (; k < nw; k += 1u) { arena[pc.dst + k] = arena[pc.src + k]; }
    }
    if k == pc.nw { atomicAdd(&ctl[C_FINISHED], 1u); }
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_module_validates() {
        crate::shader::tests::validate(&module());
    }

    #[test]
    fn structs_are_whole_words() {
        assert_eq!(std::mem::size_of::<Params>() % 16, 0);
        assert_eq!(std::mem::size_of::<Slot>(), 32);
        assert_eq!(std::mem::size_of::<Found>(), 32);
        assert!(Item::WGSL.contains(" steps: u32,"));
        assert_eq!(split(join(7, 9)), (7, 9));
    }
}

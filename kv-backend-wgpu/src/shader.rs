//! WGSL sources of the table's compute shaders, generated for a number of table segments.
//!
//! The table's layout and protocol constants (sentinels, counter numbering, flag words,
//! workgroup size, the hash) come from `kv_kernels::layout`, their one definition:
//! [`constants`] and [`common`] emit them into every module.
//!
//! The key and value arrays are split into `segs` storage bindings (segments) of
//! `1 << seg_shift` slots each, bound as separate bindings, because one storage binding is
//! limited in size (128 MiB on lavapipe, near 2 GiB on Vulkan drivers). WGSL cannot index
//! an array of bindings without extra features, so each access goes through a generated
//! helper that `switch`es on the segment. A module is generated per segment count (and per
//! pair of counts for the rehash) and cached by the device.
//!
//! Every module is emitted in one of two *flavours* that differ only in whether the key
//! segments are declared atomic: the place/delete passes need atomic keys (CAS), the other
//! passes do not (plain loads are cheaper). The bind group layout is the same for both.
//!
//! # Put protocol (per chunk; the chunks of a batch run in order)
//!
//! Dedup first (docs/protocol.md states it next to the CUDA kernels' place first, and
//! why they differ): a chunk is first resolved against itself in the lane's
//! *local table* (`ltab`, `u32[L]` with `L` the power of two >= 2n, zeroed
//! before the chunk, followed by the chunk's flags), then only the last occurrence of each
//! key touches the table.
//!
//! 1. `kv_put_dedup`: a key equal to a sentinel records `1 + i` with an atomic max in its
//!    flag word. Any other key probes the local table from its home slot: a free slot (0)
//!    is claimed with a CAS of `1 + i`; a slot holding `1 + j` belongs to the key
//!    `keys_in[j]` (slots never change owner), so when that is our key `1 + i` is maxed into
//!    it and the DUP flag is raised. The local slot goes to `slot_of[i]`.
//! 2. `kv_put_place`: when DUP is raised, an item whose local slot does not hold `1 + i`
//!    is not the last occurrence of its key and does nothing; otherwise (every item of a
//!    chunk without repeats) it places its key and writes its row, once. Thread 0 applies
//!    the sentinel keys, whose winners pass 1 recorded. A key is claimed at the first
//!    tombstone met on its probe, else at the EMPTY slot that ends it. A tombstone lost to
//!    another key sends the probe on from the slot after it, *claiming*: during a put
//!    slots only fill, so the key is still absent before that EMPTY slot, and the probe
//!    takes the next tombstone or the EMPTY slot itself without walking the chain again.
//!    Each probe moves forward only, never back to the home slot, so keys racing for the
//!    tombstones of one chain cost no more than its length each.
//!
//! # Bounded probes
//!
//! No invocation probes more than `p.budget` slots per dispatch (the table's
//! [`probe budget`](crate::WgpuBackend::set_probe_budget)): some drivers end a shader's loops
//! or the whole dispatch past a limit (Mesa's llvmpipe stops an invocation's loops after
//! about 65,535 iterations; watchdogs and browsers kill long dispatches), and an item cut
//! short must never be taken as a result. Each item keeps its probe state in the lane's
//! `probe` buffer (word `4 + 3i`: 1 + the slots probed from its home slot, 0 once it is done;
//! word `5 + 3i`: 1 + the steps to the first tombstone met, 0 for none; word `6 + 3i`,
//! while claiming: 1 + the steps to the EMPTY slot that ended the probe) and an item that
//! runs out of budget saves it, counts itself in `probe[0]` and, in a put, raises the
//! table's STALL word to its pass code (`p.code`, then `p.code + 1` for the place pass).
//! Put kernels whose code is above a raised STALL do nothing, so no later chunk runs
//! before the stalled one is finished. The host sees `probe[0]` in the chunk's readback
//! and finishes the chunk in *resume rounds* (`p.resume = 1`: only the unfinished items
//! run, from their saved state) until none is left; a put then runs its later chunks
//! again. Lookups and deletes do not depend on other chunks and are finished in place.
//! A chain of `L` slots therefore costs `L / budget` extra rounds for the items that walk
//! it, each a submission and a wait, and never a wrong answer.
//!
//! # Region order
//!
//! On large tables (`plan::Plan::region_order`) the probing kernels (place, get, contains,
//! delete) take the chunk's items grouped by table region: thread `j` handles item
//! `perm[j]`, a permutation that the `kv_region_*` kernels build per chunk before them (a
//! counting sort of the item indices by `home(key) >> rshift`). Every output stays indexed
//! by item, so nothing moves back; the order within a region is arbitrary, which is fine as
//! the place pass's winners are decided by the dedup pass and lookups are independent.
//!
//! # Key encoding
//!
//! A key slot holds `EMPTY = 0` (never used), `TOMBSTONE = 1` (deleted) or a user key.
//! Zeroed memory is an empty table, so clearing is a buffer clear. The two user keys equal
//! to the sentinels (`0` and `1`) live in the *special area*: `present[2]` then their two
//! value rows.

use std::fmt::Write as _;

use bytemuck::{Pod, Zeroable};

/// Which segments are declared atomic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Flavour {
    /// Keys atomic (CAS), values plain: `put_place`, `delete`.
    AtomicKeys,
    /// Both plain: `put_dedup`, `get`, `contains`, `count`, the `region_*` kernels.
    Plain,
}

impl Flavour {
    /// The flavour an entry point of the batch module needs.
    pub(crate) fn of(entry: &str) -> Flavour {
        match entry {
            "kv_put_place" | "kv_delete" => Flavour::AtomicKeys,
            _ => Flavour::Plain,
        }
    }
}

/// Kernel parameters, as the WGSL `Params` struct.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct Params {
    pub n: u32,
    pub width: u32,
    pub mask: u32,
    pub seg_shift: u32,
    pub base: u32,
    /// Slots of the chunk's local table less one (put).
    pub lmask: u32,
    /// Region order: a key's region is its home slot shifted right by `rshift`.
    pub rshift: u32,
    /// Region order: the table's regions, or 0 for probing in item order.
    pub nreg: u32,
    /// The table's hash seed, low and high half.
    pub seed_lo: u32,
    pub seed_hi: u32,
    /// The most slots one invocation probes per dispatch.
    pub budget: u32,
    /// The code of the dispatch's first pass (shader module docs, "Bounded probes").
    pub code: u32,
    /// 1 in a resume round: only unfinished items run, from their saved state.
    pub resume: u32,
    pub pad: [u32; 3],
}

/// Bytes of a kernel parameter block.
pub(crate) const PARAMS_BYTES: u64 = std::mem::size_of::<Params>() as u64;

/// First binding of the key segments in the batch layout (values follow the keys).
pub(crate) const BATCH_FIXED: u32 = 11;

/// First binding of the new key segments in the rehash layout (values follow the keys).
pub(crate) const REHASH_FIXED: u32 = 5;

/// Words of a lane's `probe` buffer before the per-item probe states (word 0 counts the
/// items a dispatch left unfinished).
pub(crate) const PROBE_HDR: u32 = 4;

/// Words of probe state per item (module docs, "Bounded probes").
pub(crate) const PROBE_WORDS: u32 = 3;

/// Table regions a chunk's items are grouped by when probing in region order (fewer when
/// the table has fewer slots): one per thread of a workgroup, which the ordering kernels
/// rely on.
pub(crate) const REGIONS: u32 = WORKGROUP;

pub(crate) use kv_kernels::layout::WORKGROUP;

/// Items each thread of the region histogram and scatter kernels handles.
pub(crate) const ORDER_ITEMS: u32 = 16;

/// The declarations every module shares, after [`constants`]; `{C1}` and `{C2}` are filled
/// in by [`common`].
const COMMON: &str = r#"
struct Params {
    n: u32,
    width: u32,
    mask: u32,
    seg_shift: u32,
    base: u32,
    lmask: u32,
    rshift: u32,
    nreg: u32,
    seed_lo: u32,
    seed_hi: u32,
    budget: u32,
    code: u32,
    resume: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

// The table's hash (kv_kernels::layout::hash): fmix64 of the key xor the table's seed.
fn hash(key: u64) -> u64 {
    var h = key ^ ((u64(p.seed_hi) << 32u) | u64(p.seed_lo));
    h ^= h >> 33u;
    h *= {C1}lu;
    h ^= h >> 33u;
    h *= {C2}lu;
    h ^= h >> 33u;
    return h;
}

fn home(key: u64) -> u32 {
    return u32(hash(key) & u64(p.mask));
}

// Whether a put pass (or rehash piece) of code `code` must do nothing: an earlier one left
// items unfinished (module docs, "Bounded probes").
fn stalled(code: u32) -> bool {
    let s = atomicLoad(&ctl[C_STALL]);
    return s != 0lu && s < u64(code);
}

fn item(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid;
}

fn seg_of(slot: u32) -> u32 {
    return slot >> p.seg_shift;
}

// The chunk's flags after its local table: DUP (a key repeats in the chunk), then 1 + the
// last index of each special key (0 when absent).
fn dup_flag() -> u32 { return p.lmask + 1u + F_DUP; }
fn spec_flag(k: u32) -> u32 { return p.lmask + 1u + F_SPEC_WIN + k; }

fn row_of(slot: u32) -> u32 {
    return (slot & ((1u << p.seg_shift) - 1u)) * p.width;
}
"#;

/// The WGSL constants of the table's layout and protocol, generated from
/// [`kv_kernels::layout`], their one definition: the sentinels, the workgroup size, the
/// counter numbering, the put chunk's flag words and the special area's layout.
fn constants() -> String {
    use kv_kernels::layout::{self as l, counter as c, flag as f};
    let mut out = String::new();
    let u64s = [("EMPTY", l::EMPTY), ("TOMB", l::TOMBSTONE)];
    for (name, v) in u64s {
        let _ = writeln!(out, "const {name}: u64 = {v}lu;");
    }
    let u32s = [
        ("WG", l::WORKGROUP as usize),
        ("C_INSERTED", c::INSERTED),
        ("C_FROM_EMPTY", c::FROM_EMPTY),
        ("C_REMOVED", c::REMOVED),
        ("C_SPEC_INSERTED", c::SPEC_INSERTED),
        ("C_SPEC_REMOVED", c::SPEC_REMOVED),
        ("C_ERRORS", c::ERRORS),
        ("C_MOVED", c::MOVED),
        ("C_LIVE", c::LIVE),
        ("C_TOMBS", c::TOMBS),
        ("C_STALL", c::STALL),
        ("C_MISSING", c::MISSING),
        ("C_DISCARD", c::DISCARD),
        ("F_DUP", f::DUP),
        ("F_SPEC_WIN", f::SPEC_WIN),
        ("SPECIAL_ROW0", l::special_row(0, 1) as usize),
    ];
    for (name, v) in u32s {
        let _ = writeln!(out, "const {name}: u32 = {v}u;");
    }
    out
}

/// [`constants`], then [`COMMON`] with the hash's constants from [`kv_kernels::layout`], the
/// one definition of the table's hash.
fn common() -> String {
    constants()
        + &COMMON
            .replace("{C1}", &format!("{:#x}", kv_kernels::layout::FMIX_C1))
            .replace("{C2}", &format!("{:#x}", kv_kernels::layout::FMIX_C2))
}

/// Emits `fn {name}(seg: u32, off: u32{extra_params}) {ret} { switch seg { ... } }` where
/// each case runs `body` with `{a}` replaced by the segment's array name.
fn switch_fn(
    out: &mut String,
    name: &str,
    array: &str,
    segs: usize,
    extra_params: &str,
    ret: &str,
    body: &str,
) {
    let ret_decl = if ret.is_empty() {
        String::new()
    } else {
        format!(" -> {ret}")
    };
    let _ = writeln!(
        out,
        "fn {name}(seg: u32, off: u32{extra_params}){ret_decl} {{\n    switch seg {{"
    );
    for s in 0..segs {
        let b = body.replace("{a}", &format!("{array}{s}[off]"));
        let _ = writeln!(out, "        case {s}u: {{ {b} }}");
    }
    let _ = writeln!(out, "        default: {{}}\n    }}");
    if !ret.is_empty() {
        let _ = writeln!(out, "    return 0lu;");
    }
    let _ = writeln!(out, "}}");
}

/// Declares `segs` segment bindings named `{name}{s}` from `first`, and their accessors.
fn segments(out: &mut String, name: &str, first: u32, segs: usize, atomic: bool, prefix: &str) {
    let ty = if atomic { "atomic<u64>" } else { "u64" };
    for s in 0..segs {
        let _ = writeln!(
            out,
            "@group(0) @binding({}) var<storage, read_write> {name}{s}: array<{ty}>;",
            first + s as u32
        );
    }
    let load = if atomic {
        "return atomicLoad(&{a});"
    } else {
        "return {a};"
    };
    switch_fn(out, &format!("{prefix}load"), name, segs, "", "u64", load);
    if atomic {
        // Atomic segments (keys, in the place and delete passes) are only loaded and
        // compare-exchanged. A strong CAS from the weak one: retry only on a spurious
        // failure.
        switch_fn(
            out,
            &format!("{prefix}cas"),
            name,
            segs,
            ", cmp: u64, v: u64",
            "u64",
            "loop { let r = atomicCompareExchangeWeak(&{a}, cmp, v); if r.exchanged || r.old_value != cmp { return r.old_value; } }",
        );
    } else {
        switch_fn(
            out,
            &format!("{prefix}store"),
            name,
            segs,
            ", v: u64",
            "",
            "{a} = v;",
        );
    }
}

/// The batch module (put passes, get, contains, delete, count) for `segs` segments.
pub(crate) fn batch_module(segs: usize, flavour: Flavour) -> String {
    let mut s = String::new();
    s.push_str(
        r#"
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> ctl: array<atomic<u64>>;
@group(0) @binding(2) var<storage, read_write> special: array<atomic<u64>>;
@group(0) @binding(3) var<storage, read_write> keys_in: array<u64>;
@group(0) @binding(4) var<storage, read_write> vals_io: array<u64>;
@group(0) @binding(5) var<storage, read_write> slot_of: array<u32>;
@group(0) @binding(6) var<storage, read_write> flags8: array<atomic<u32>>;
@group(0) @binding(7) var<storage, read_write> ltab: array<atomic<u32>>;
@group(0) @binding(8) var<storage, read_write> perm: array<u32>;
@group(0) @binding(9) var<storage, read_write> rcnt: array<atomic<u32>>;
@group(0) @binding(10) var<storage, read_write> probe: array<atomic<u32>>;
"#,
    );
    s.push_str(&common());
    let _ = writeln!(
        s,
        "const REGIONS: u32 = {REGIONS}u;\nconst ORDER_ITEMS: u32 = {ORDER_ITEMS}u;\nconst PROBE_HDR: u32 = {PROBE_HDR}u;\nconst PROBE_WORDS: u32 = {PROBE_WORDS}u;"
    );
    segments(
        &mut s,
        "keys",
        BATCH_FIXED,
        segs,
        flavour == Flavour::AtomicKeys,
        "k",
    );
    segments(&mut s, "vals", BATCH_FIXED + segs as u32, segs, false, "v");
    s.push_str(
        r#"
var<workgroup> wg_cnt: array<atomic<u32>, 4>;

// The chunk item probed by thread j: in region order (`perm`, built by the `kv_region_*`
// kernels) when p.nreg != 0, else item j itself. j < p.n.
fn at(j: u32) -> u32 {
    if p.nreg == 0u { return j; }
    return perm[j];
}

fn set_flag8(i: u32) {
    atomicOr(&flags8[i >> 2u], 1u << ((i & 3u) * 8u));
}

fn get_flag8(i: u32) -> bool {
    return ((atomicLoad(&flags8[i >> 2u]) >> ((i & 3u) * 8u)) & 0xffu) != 0u;
}

// Probe state of item i (module docs, "Bounded probes").
fn st_at(i: u32) -> u32 { return PROBE_HDR + PROBE_WORDS * i; }

// The slots item i has probed from its home slot: 0 in a first round. The state word holds
// 1 + that, so that 0 means done even for an item saved before its first step.
fn st_steps(i: u32) -> u32 {
    if p.resume == 0u { return 0u; }
    return atomicLoad(&probe[st_at(i)]) - 1u;
}

// 1 + the steps from item i's home slot to the first tombstone it met, 0 for none.
fn st_tomb(i: u32) -> u32 {
    if p.resume == 0u { return 0u; }
    return atomicLoad(&probe[st_at(i) + 1u]);
}

// While claiming: 1 + the steps from item i's home slot to the EMPTY slot that ended its
// probe, else 0.
fn st_end(i: u32) -> u32 {
    if p.resume == 0u { return 0u; }
    return atomicLoad(&probe[st_at(i) + 2u]);
}

// Whether item i has work in this round: every item in a first round, only the
// unfinished ones in a resume round.
fn st_active(i: u32) -> bool {
    return p.resume == 0u || atomicLoad(&probe[st_at(i)]) != 0u;
}

// Item i is done (never resumed).
fn st_done(i: u32) {
    atomicStore(&probe[st_at(i)], 0u);
}

// Item i ran out of budget after `steps` slots: save where it is and count it. An unfinished
// item has `steps < mask`, so `1 + steps` does not wrap.
fn st_save(i: u32, steps: u32, tomb: u32, end: u32) {
    atomicStore(&probe[st_at(i)], steps + 1u);
    atomicStore(&probe[st_at(i) + 1u], tomb);
    atomicStore(&probe[st_at(i) + 2u], end);
    atomicAdd(&probe[0], 1u);
}

fn flush(lid: u32, c0: u32, c1: u32, c2: u32, c3: u32) {
    workgroupBarrier();
    if lid == 0u {
        let a = atomicLoad(&wg_cnt[0]);
        let b = atomicLoad(&wg_cnt[1]);
        let c = atomicLoad(&wg_cnt[2]);
        let d = atomicLoad(&wg_cnt[3]);
        if a != 0u { atomicAdd(&ctl[c0], u64(a)); }
        if b != 0u { atomicAdd(&ctl[c1], u64(b)); }
        if c != 0u { atomicAdd(&ctl[c2], u64(c)); }
        if d != 0u { atomicAdd(&ctl[c3], u64(d)); }
    }
}

"#,
    );
    match flavour {
        Flavour::AtomicKeys => s.push_str(ATOMIC_KEYS_PASSES),
        Flavour::Plain => s.push_str(PLAIN_PASSES),
    }
    format!("{COMMON_HEADER}{s}")
}

const COMMON_HEADER: &str = "// vramkv wgpu table kernels (generated)\n";

const ATOMIC_KEYS_PASSES: &str = r#"
fn koff(pos: u32) -> u32 { return pos & ((1u << p.seg_shift) - 1u); }

// The last occurrence of each special key in the chunk writes its row (thread 0 of the
// place pass; pass 1 recorded the winners).
fn put_specials() {
    let w = p.width;
    for (var k = 0u; k < 2u; k += 1u) {
        let win = atomicLoad(&ltab[spec_flag(k)]);
        if win != 0u {
            let i = win - 1u;
            for (var j = 0u; j < w; j += 1u) {
                atomicStore(&special[SPECIAL_ROW0 + k * w + j], vals_io[i * w + j]);
            }
            if atomicExchange(&special[k], 1lu) == 0lu { atomicAdd(&ctl[C_SPEC_INSERTED], 1lu); }
        }
    }
}

// Put pass 2: if item i is the last occurrence of its key in the chunk, place the key
// (claim the first tombstone met or the EMPTY slot that ends the probe, or find it) and
// write its row. At most p.budget slots per item (module docs, "Bounded probes").
@compute @workgroup_size(WG)
fn kv_put_place(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let code = p.code + 1u;
    let skip = stalled(code);
    let j = item(wid, nwg, lid);
    if j == 0u && !skip && p.resume == 0u { put_specials(); }
    var i = j;
    var key = 0lu;
    var live = j < p.n && !skip;
    if live { i = at(j); key = keys_in[i]; live = st_active(i); }
    var last = live && key > TOMB;
    if last && atomicLoad(&ltab[dup_flag()]) != 0u {
        last = atomicLoad(&ltab[slot_of[i]]) == i + 1u;
    }
    if live && !last { st_done(i); }
    if last {
        // 0: unfinished, 1: from empty, 2: from tombstone, 3: found, 4: overflow
        var outcome = 0u;
        var slot = 0u;
        let h = home(key);
        var steps = st_steps(i);
        var tomb = st_tomb(i);
        var end = st_end(i);
        var pos = (h + steps) & p.mask;
        for (var b = 0u; b < p.budget; b += 1u) {
            var cur = kload(seg_of(pos), koff(pos));
            if end != 0u {
                // Claiming (module docs): the next tombstone, else the EMPTY slot `end - 1`
                // steps from home.
                var want = TOMB;
                if steps + 1u == end { want = EMPTY; }
                if cur == want {
                    let old = kcas(seg_of(pos), koff(pos), want, key);
                    if old == want {
                        outcome = 2u;
                        if want == EMPTY { outcome = 1u; }
                        slot = pos;
                        break;
                    }
                    cur = old;
                }
                if cur == key { outcome = 3u; slot = pos; break; }
                // The EMPTY slot went to another key: probe on as usual.
                if steps + 1u == end { end = 0u; }
                steps += 1u;
                pos = (pos + 1u) & p.mask;
                continue;
            }
            if cur == EMPTY {
                if tomb != 0u {
                    let t = (h + tomb - 1u) & p.mask;
                    let old = kcas(seg_of(t), koff(t), TOMB, key);
                    if old == TOMB { outcome = 2u; slot = t; break; }
                    if old == key { outcome = 3u; slot = t; break; }
                    // Another key took the tombstone: claim from the slot after it.
                    end = steps + 1u;
                    steps = tomb;
                    tomb = 0u;
                    pos = (h + steps) & p.mask;
                    continue;
                }
                let old = kcas(seg_of(pos), koff(pos), EMPTY, key);
                if old == EMPTY { outcome = 1u; slot = pos; break; }
                cur = old;
            }
            if cur == key { outcome = 3u; slot = pos; break; }
            if cur == TOMB && tomb == 0u { tomb = steps + 1u; }
            if steps >= p.mask { outcome = 4u; break; }
            steps += 1u;
            pos = (pos + 1u) & p.mask;
        }
        if outcome == 0u {
            st_save(i, steps, tomb, end);
            atomicMax(&ctl[C_STALL], u64(code));
        } else {
            st_done(i);
        }
        if outcome == 4u {
            atomicAdd(&wg_cnt[3], 1u);
        } else if outcome != 0u {
            if outcome == 1u { atomicAdd(&wg_cnt[1], 1u); }
            if outcome <= 2u { atomicAdd(&wg_cnt[0], 1u); }
            let w = p.width;
            let seg = seg_of(slot);
            let r = row_of(slot);
            for (var j = 0u; j < w; j += 1u) {
                vstore(seg, r + j, vals_io[i * w + j]);
            }
        }
    }
    flush(lid, C_INSERTED, C_FROM_EMPTY, C_DISCARD, C_ERRORS);
}

// Delete: a repeated key is removed (and counted) once, the second CAS meets a tombstone.
// At most p.budget slots per item.
@compute @workgroup_size(WG)
fn kv_delete(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let j = item(wid, nwg, lid);
    var i = j;
    var live = j < p.n;
    if live { i = at(j); live = st_active(i); }
    if live {
        let key = keys_in[i];
        if key <= TOMB {
            if atomicExchange(&special[u32(key)], 0lu) != 0lu { atomicAdd(&wg_cnt[1], 1u); }
            st_done(i);
        } else {
            let h = home(key);
            var steps = st_steps(i);
            var pos = (h + steps) & p.mask;
            var done = false;
            for (var b = 0u; b < p.budget; b += 1u) {
                let cur = kload(seg_of(pos), koff(pos));
                if cur == key {
                    if kcas(seg_of(pos), koff(pos), key, TOMB) == key { atomicAdd(&wg_cnt[0], 1u); }
                    done = true;
                    break;
                }
                if cur == EMPTY || steps >= p.mask { done = true; break; }
                steps += 1u;
                pos = (pos + 1u) & p.mask;
            }
            if done { st_done(i); } else { st_save(i, steps, 0u, 0u); }
        }
    }
    flush(lid, C_REMOVED, C_SPEC_REMOVED, C_DISCARD, C_DISCARD);
}
"#;

const PLAIN_PASSES: &str = r#"
// Put pass 1: record key i in the chunk's local table (see the module docs). At most
// p.budget slots per item.
@compute @workgroup_size(WG)
fn kv_put_dedup(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let code = p.code;
    let i = item(wid, nwg, lid);
    if i >= p.n || stalled(code) || !st_active(i) { return; }
    let key = keys_in[i];
    let me = i + 1u;
    if key <= TOMB {
        atomicMax(&ltab[spec_flag(u32(key))], me);
        st_done(i);
        return;
    }
    let h = u32(hash(key) & u64(p.lmask));
    var steps = st_steps(i);
    var pos = (h + steps) & p.lmask;
    for (var b = 0u; b < p.budget; b += 1u) {
        var cur = atomicLoad(&ltab[pos]);
        if cur == 0u {
            let r = atomicCompareExchangeWeak(&ltab[pos], 0u, me);
            if r.exchanged { slot_of[i] = pos; st_done(i); return; }
            // A spurious failure: try the slot again.
            if r.old_value == 0u { continue; }
            cur = r.old_value;
        }
        if keys_in[cur - 1u] == key {
            atomicMax(&ltab[pos], me);
            atomicStore(&ltab[dup_flag()], 1u);
            slot_of[i] = pos;
            st_done(i);
            return;
        }
        if steps >= p.lmask { atomicAdd(&ctl[C_ERRORS], 1lu); slot_of[i] = pos; st_done(i); return; }
        steps += 1u;
        pos = (pos + 1u) & p.lmask;
    }
    st_save(i, steps, 0u, 0u);
    atomicMax(&ctl[C_STALL], u64(code));
}

// Get (mode GET), contains (CONTAINS) or count-missing (MISSING) of item i: at most
// p.budget slots; an unfinished item writes nothing but its probe state. Count-missing
// adds to the workgroup's counter instead of writing a flag.
const CONTAINS: u32 = 0u;
const GET: u32 = 1u;
const MISSING: u32 = 2u;

fn lookup(i: u32, mode: u32) {
    if !st_active(i) { return; }
    let key = keys_in[i];
    let w = p.width;
    let with_values = mode == GET;
    if key <= TOMB {
        let k = u32(key);
        let present = atomicLoad(&special[k]) != 0lu;
        if mode == MISSING {
            if !present { atomicAdd(&wg_cnt[0], 1u); }
            st_done(i);
            return;
        }
        if present { set_flag8(i); }
        if with_values {
            for (var j = 0u; j < w; j += 1u) {
                var v = 0lu;
                if present { v = atomicLoad(&special[SPECIAL_ROW0 + k * w + j]); }
                vals_io[i * w + j] = v;
            }
        }
        st_done(i);
        return;
    }
    let h = home(key);
    var steps = st_steps(i);
    var pos = (h + steps) & p.mask;
    var found = false;
    var done = false;
    for (var b = 0u; b < p.budget; b += 1u) {
        let cur = kload(seg_of(pos), pos & ((1u << p.seg_shift) - 1u));
        if cur == key { found = true; done = true; break; }
        if cur == EMPTY || steps >= p.mask { done = true; break; }
        steps += 1u;
        pos = (pos + 1u) & p.mask;
    }
    if !done {
        st_save(i, steps, 0u, 0u);
        return;
    }
    st_done(i);
    if mode == MISSING {
        if !found { atomicAdd(&wg_cnt[0], 1u); }
        return;
    }
    if found { set_flag8(i); }
    if with_values {
        if found {
            let seg = seg_of(pos);
            let r = row_of(pos);
            for (var j = 0u; j < w; j += 1u) {
                vals_io[i * w + j] = vload(seg, r + j);
            }
        } else {
            for (var j = 0u; j < w; j += 1u) {
                vals_io[i * w + j] = 0lu;
            }
        }
    }
}

@compute @workgroup_size(WG)
fn kv_get(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let j = item(wid, nwg, lid);
    if j < p.n { lookup(at(j), GET); }
}

@compute @workgroup_size(WG)
fn kv_contains(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let j = item(wid, nwg, lid);
    if j < p.n { lookup(at(j), CONTAINS); }
}

// Count-missing: the keys of the batch not in the table, every occurrence, into
// ctl[C_MISSING] (the first step of exact admission).
@compute @workgroup_size(WG)
fn kv_count_missing(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let j = item(wid, nwg, lid);
    if j < p.n { lookup(at(j), MISSING); }
    flush(lid, C_MISSING, C_DISCARD, C_DISCARD, C_DISCARD);
}

// Region order (see `region_order` in table.rs): the probing kernels visit the chunk's
// items grouped by table region, `perm[j]` being the item thread j probes. `perm` is a
// counting sort by region: `kv_region_hist` counts the items of each region into
// rcnt[0 .. REGIONS), `kv_region_scan` (one workgroup) writes the exclusive prefix sums into
// rcnt[REGIONS .. 2 * REGIONS) and `kv_region_scatter` hands out the positions. The table
// has p.nreg regions (a power of two, at most REGIONS) of 1 << p.rshift slots; the special
// keys count as region 0. Workgroup w of the histogram and scatter kernels takes the
// REGIONS * ORDER_ITEMS items from w * REGIONS * ORDER_ITEMS, ORDER_ITEMS per thread, and
// adds its counts to the global ones once per region (thread r owns region r).

fn region_of(key: u64) -> u32 {
    if key <= TOMB { return 0u; }
    return home(key) >> p.rshift;
}

var<workgroup> wg_reg: array<atomic<u32>, REGIONS>;
var<workgroup> wg_base: array<u32, REGIONS>;

fn order_item(wid: vec3<u32>, nwg: vec3<u32>, lid: u32, k: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * (REGIONS * ORDER_ITEMS) + k * REGIONS + lid;
}

@compute @workgroup_size(WG)
fn kv_region_hist(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    atomicStore(&wg_reg[lid], 0u);
    workgroupBarrier();
    for (var k = 0u; k < ORDER_ITEMS; k += 1u) {
        let i = order_item(wid, nwg, lid, k);
        if i < p.n { atomicAdd(&wg_reg[region_of(keys_in[i])], 1u); }
    }
    workgroupBarrier();
    let c = atomicLoad(&wg_reg[lid]);
    if c != 0u { atomicAdd(&rcnt[lid], c); }
}

@compute @workgroup_size(WG)
fn kv_region_scan(@builtin(local_invocation_index) lid: u32) {
    let c = atomicLoad(&rcnt[lid]);
    wg_base[lid] = c;
    workgroupBarrier();
    // Inclusive scan (Hillis-Steele).
    for (var d = 1u; d < REGIONS; d <<= 1u) {
        var v = wg_base[lid];
        if lid >= d { v += wg_base[lid - d]; }
        workgroupBarrier();
        wg_base[lid] = v;
        workgroupBarrier();
    }
    atomicStore(&rcnt[REGIONS + lid], wg_base[lid] - c);
}

@compute @workgroup_size(WG)
fn kv_region_scatter(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    atomicStore(&wg_reg[lid], 0u);
    workgroupBarrier();
    var reg: array<u32, ORDER_ITEMS>;
    var rank: array<u32, ORDER_ITEMS>;
    for (var k = 0u; k < ORDER_ITEMS; k += 1u) {
        let i = order_item(wid, nwg, lid, k);
        if i < p.n {
            let r = region_of(keys_in[i]);
            reg[k] = r;
            rank[k] = atomicAdd(&wg_reg[r], 1u);
        }
    }
    workgroupBarrier();
    let c = atomicLoad(&wg_reg[lid]);
    if c != 0u { wg_base[lid] = atomicAdd(&rcnt[REGIONS + lid], c); }
    workgroupBarrier();
    for (var k = 0u; k < ORDER_ITEMS; k += 1u) {
        let i = order_item(wid, nwg, lid, k);
        if i < p.n { perm[wg_base[reg[k]] + rank[k]] = i; }
    }
}

// Live keys and tombstones of slots base .. base + n (checks).
@compute @workgroup_size(WG)
fn kv_count(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = item(wid, nwg, lid);
    if i < p.n {
        let s = p.base + i;
        let k = kload(seg_of(s), s & ((1u << p.seg_shift) - 1u));
        if k > TOMB { atomicAdd(&wg_cnt[0], 1u); }
        if k == TOMB { atomicAdd(&wg_cnt[1], 1u); }
    }
    flush(lid, C_LIVE, C_TOMBS, C_DISCARD, C_DISCARD);
}
"#;

/// The rehash module: moves the live keys of one piece of one old segment into a table of
/// `segs` segments (dispatched once per piece, `p.n` slots from slot `p.base` of the old
/// segment, each piece with its own `p.code`).
///
/// Bindings: 0 params (`mask`/`seg_shift`/`width`/seed/budget of the new table), 1 control,
/// 2 the old key segment, 3 the old value segment, 4 the piece's probe states (`u32` per
/// slot of the piece: the slots probed, 0 once done), then the new key segments (atomic)
/// and the new value segments. Probes are bounded as the batch kernels' are: a piece that
/// leaves keys unfinished raises STALL to its code, later pieces do nothing, and the host
/// finishes the piece in resume rounds before it sends the rest again.
pub(crate) fn rehash_module(segs: usize) -> String {
    let mut s = String::from(COMMON_HEADER);
    s.push_str(
        r#"
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> ctl: array<atomic<u64>>;
@group(0) @binding(2) var<storage, read_write> okeys: array<u64>;
@group(0) @binding(3) var<storage, read_write> ovals: array<u64>;
@group(0) @binding(4) var<storage, read_write> rprobe: array<u32>;
"#,
    );
    s.push_str(&common());
    segments(&mut s, "nkeys", REHASH_FIXED, segs, true, "nk");
    segments(
        &mut s,
        "nvals",
        REHASH_FIXED + segs as u32,
        segs,
        false,
        "nv",
    );
    s.push_str(
        r#"
var<workgroup> wg_cnt: array<atomic<u32>, 2>;

@compute @workgroup_size(WG)
fn kv_rehash(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let l = item(wid, nwg, lid);
    var live = l < p.n && !stalled(p.code);
    if live && p.resume != 0u { live = rprobe[l] != 0u; }
    if live {
        let i = p.base + l;
        let key = okeys[i];
        var steps = 0u;
        if key > TOMB {
            let h = home(key);
            if p.resume != 0u { steps = rprobe[l]; }
            var pos = (h + steps) & p.mask;
            var done = false;
            for (var b = 0u; b < p.budget; b += 1u) {
                let off = pos & ((1u << p.seg_shift) - 1u);
                let seg = seg_of(pos);
                if nkload(seg, off) == EMPTY && nkcas(seg, off, EMPTY, key) == EMPTY {
                    let w = p.width;
                    let r = off * w;
                    let orow = i * w;
                    for (var j = 0u; j < w; j += 1u) {
                        nvstore(seg, r + j, ovals[orow + j]);
                    }
                    atomicAdd(&wg_cnt[0], 1u);
                    done = true;
                    break;
                }
                if steps >= p.mask { atomicAdd(&wg_cnt[1], 1u); done = true; break; }
                steps += 1u;
                pos = (pos + 1u) & p.mask;
            }
            if done {
                steps = 0u;
            } else {
                atomicMax(&ctl[C_STALL], u64(p.code));
            }
        }
        rprobe[l] = steps;
    }
    workgroupBarrier();
    if lid == 0u {
        let a = atomicLoad(&wg_cnt[0]);
        let b = atomicLoad(&wg_cnt[1]);
        if a != 0u { atomicAdd(&ctl[C_MOVED], u64(a)); }
        if b != 0u { atomicAdd(&ctl[C_ERRORS], u64(b)); }
    }
}
"#,
    );
    s
}

/// `kv_kernels::layout::expired` in WGSL, for every module with expiry times: an entry
/// whose expiry time is `e` (0: never) has expired at `now`.
pub(crate) const EXPIRED_WGSL: &str =
    "fn expired_at(e: u64, now: u64) -> bool { return e != 0lu && e <= now; }\n";

/// Kernel parameters of the cache module, as its WGSL `CParams` struct (u64 values as
/// halves). Sections of the batch buffers are `cap` items apart (`crate::cache`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct CacheParams {
    /// Items of the dispatch (put: grouped items of the piece; lookups, takes: items; count:
    /// buckets).
    pub n: u32,
    /// Put: the touched buckets of the piece.
    pub touched: u32,
    /// Items per section of the batch buffers.
    pub cap: u32,
    pub width: u32,
    /// `kv_kernels::layout::cache_policy`.
    pub policy: u32,
    /// Lookup: 1 for a get (scores change), 0 for a peek or contains.
    pub access: u32,
    /// Lookup, take: 1 when the rows are wanted.
    pub want_rows: u32,
    /// Put: the most items one bucket's invocation applies per dispatch.
    pub round_items: u32,
    /// Lookup: the batch index of the dispatch's first item (LRU order bits).
    pub base: u32,
    pub pad: [u32; 3],
    /// Now, in the table clock's milliseconds.
    pub now_lo: u32,
    pub now_hi: u32,
    /// Lookup: `kv_kernels::ops::cache::lru_score(clock, 0)` of the batch.
    pub lru0_lo: u32,
    pub lru0_hi: u32,
}

/// Bindings of the cache module after the parameters (all storage).
pub(crate) const CACHE_STORAGE: u32 = 9;

/// The WGSL constants of the cache module, from their one definition in
/// `kv_kernels::layout` and `kv_kernels::ops::cache`.
fn cache_constants() -> String {
    use kv_kernels::layout::{self as l, cache_counter as c, cache_policy as pol};
    let mut out = String::new();
    let u32s = [
        ("WG", l::WORKGROUP as u64),
        ("SLOTS", l::CACHE_BUCKET),
        ("LRU", u64::from(pol::LRU)),
        ("LFU", u64::from(pol::LFU)),
        (
            "LRU_ORDER_BITS",
            u64::from(kv_kernels::ops::cache::LRU_ORDER_BITS),
        ),
        ("C_EXPIRED_REUSED", c::EXPIRED_REUSED as u64),
        ("C_LIVE", c::LIVE as u64),
        ("C_APPLIED", c::APPLIED as u64),
    ];
    for (name, v) in u32s {
        let _ = writeln!(out, "const {name}: u32 = {v}u;");
    }
    out
}

/// The cache-table module (`crate::cache`): one array per field of the table (bindings 2 to
/// 6), the batch's u64 inputs (`bin`: keys, scores, expiry times, then rows, sections
/// `cap` items apart), its u64 outputs (`bout`: the same sections) and its u32 words
/// (`b32`: flags, bucket per item or per touched bucket, offsets, progress).
///
/// - `kc_put`: one invocation per touched bucket applies that bucket's items in batch
///   order (the host deduplicated and grouped them) with the CPU backend's rule, at most
///   `p.round_items` per dispatch; `b32` keeps how far each bucket got, and the APPLIED
///   counter how many items the dispatch applied, so that a dispatch cut short is resumed,
///   never taken as done. No atomics but the counters: a bucket has one writer.
/// - `kc_lookup`: get, peek, contains, one invocation per item; a get's score change is one
///   64-bit atomic (LRU max, LFU add).
/// - `kc_take`: take and delete of distinct keys (the host deduplicated them), one
///   invocation per key; the used bit is cleared with an atomic and.
/// - `kc_count`: the live entries, one invocation per bucket.
///
/// Every loop is bounded: 32 slots, `width` words, `p.round_items` items.
pub(crate) fn cache_module() -> String {
    let mut s = cache_constants();
    s.push_str(EXPIRED_WGSL);
    s.push_str(CACHE_SRC);
    s
}

const CACHE_SRC: &str = r#"
struct CParams {
    n: u32,
    touched: u32,
    cap: u32,
    width: u32,
    policy: u32,
    access: u32,
    want_rows: u32,
    round_items: u32,
    base: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
    now_lo: u32,
    now_hi: u32,
    lru0_lo: u32,
    lru0_hi: u32,
}

@group(0) @binding(0) var<uniform> p: CParams;
@group(0) @binding(1) var<storage, read_write> ctl: array<atomic<u64>>;
@group(0) @binding(2) var<storage, read_write> tkeys: array<u64>;
@group(0) @binding(3) var<storage, read_write> tscores: array<atomic<u64>>;
@group(0) @binding(4) var<storage, read_write> texp: array<u64>;
@group(0) @binding(5) var<storage, read_write> trows: array<u64>;
@group(0) @binding(6) var<storage, read_write> tused: array<atomic<u32>>;
@group(0) @binding(7) var<storage, read_write> bin: array<u64>;
@group(0) @binding(8) var<storage, read_write> bout: array<u64>;
@group(0) @binding(9) var<storage, read_write> b32: array<u32>;

const NONE: u32 = SLOTS;
const U64_MAX: u64 = 0xfffffffffffffffflu;

fn item(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid;
}

fn now() -> u64 { return (u64(p.now_hi) << 32u) | u64(p.now_lo); }

fn expired(e: u64) -> bool { return expired_at(e, now()); }

// kv_kernels::ops::cache::visible_score.
fn visible(s: u64) -> u64 {
    if p.policy == LRU { return s >> LRU_ORDER_BITS; }
    return s;
}

// Sections of the batch buffers: u64 words (bin, bout) and u32 words (b32).
fn sec_score(i: u32) -> u32 { return p.cap + i; }
fn sec_exp(i: u32) -> u32 { return 2u * p.cap + i; }
fn sec_row(i: u32) -> u32 { return 3u * p.cap + i * p.width; }
fn sec_bucket(i: u32) -> u32 { return p.cap + i; }
fn sec_off(t: u32) -> u32 { return 2u * p.cap + t; }
fn sec_done(t: u32) -> u32 { return 3u * p.cap + 1u + t; }

// The slot (0..SLOTS) of key's live entry in bucket b, NONE if it has none.
fn find(b: u32, key: u64) -> u32 {
    let used = atomicLoad(&tused[b]);
    let base = b * SLOTS;
    for (var j = 0u; j < SLOTS; j += 1u) {
        if ((used >> j) & 1u) != 0u && tkeys[base + j] == key && !expired(texp[base + j]) {
            return j;
        }
    }
    return NONE;
}

// Reports an eviction at item position i: key, stored score, expiry time; the row is copied
// by the caller.
fn report(i: u32, key: u64, score: u64, e: u64) {
    bout[i] = key;
    bout[sec_score(i)] = score;
    bout[sec_exp(i)] = e;
    b32[i] = 1u;
}

@compute @workgroup_size(WG)
fn kc_put(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = item(wid, nwg, lid);
    if t >= p.touched { return; }
    let b = b32[sec_bucket(t)];
    let lo = b32[sec_off(t)];
    let hi = b32[sec_off(t + 1u)];
    var done = b32[sec_done(t)];
    let base = b * SLOTS;
    let w = p.width;
    var used = atomicLoad(&tused[b]);
    // Expired entries leave the bucket as soon as a put touches it (CpuCache's rule).
    var dropped = 0u;
    for (var j = 0u; j < SLOTS; j += 1u) {
        if ((used >> j) & 1u) != 0u && expired(texp[base + j]) {
            used &= ~(1u << j);
            dropped += 1u;
        }
    }
    var applied = 0u;
    for (var r = 0u; r < p.round_items; r += 1u) {
        let i = lo + done;
        if i >= hi { break; }
        let key = bin[i];
        let score = bin[sec_score(i)];
        let e = bin[sec_exp(i)];
        var hit = NONE;
        var free = NONE;
        var victim = NONE;
        var low = 0lu;
        for (var j = 0u; j < SLOTS; j += 1u) {
            if ((used >> j) & 1u) != 0u {
                let s = atomicLoad(&tscores[base + j]);
                if hit == NONE && tkeys[base + j] == key { hit = j; }
                if victim == NONE || s < low { victim = j; low = s; }
            } else if free == NONE {
                free = j;
            }
        }
        b32[i] = 0u;
        var at = NONE;
        var stored = score;
        if hit != NONE {
            at = hit;
            if p.policy == LFU {
                let old = atomicLoad(&tscores[base + hit]);
                stored = old + score;
                if stored < old { stored = U64_MAX; }
            }
        } else if free != NONE {
            at = free;
        } else if visible(score) < visible(low) {
            // Full, and the new key scores below every entry: it is turned away (ties go
            // against the entry already there).
            report(i, key, score, e);
            for (var k = 0u; k < w; k += 1u) { bout[sec_row(i) + k] = bin[sec_row(i) + k]; }
        } else {
            // Full: the entry of lowest (score, slot) leaves.
            let v = base + victim;
            report(i, tkeys[v], low, texp[v]);
            for (var k = 0u; k < w; k += 1u) { bout[sec_row(i) + k] = trows[v * w + k]; }
            at = victim;
        }
        if at != NONE {
            let s = base + at;
            used |= 1u << at;
            tkeys[s] = key;
            atomicStore(&tscores[s], stored);
            texp[s] = e;
            for (var k = 0u; k < w; k += 1u) { trows[s * w + k] = bin[sec_row(i) + k]; }
        }
        done += 1u;
        applied += 1u;
    }
    atomicStore(&tused[b], used);
    b32[sec_done(t)] = done;
    if dropped != 0u { atomicAdd(&ctl[C_EXPIRED_REUSED], u64(dropped)); }
    if applied != 0u { atomicAdd(&ctl[C_APPLIED], u64(applied)); }
}

// Get (p.access = 1), peek or contains of item i.
@compute @workgroup_size(WG)
fn kc_lookup(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = item(wid, nwg, lid);
    if i >= p.n { return; }
    let b = b32[sec_bucket(i)];
    let j = find(b, bin[i]);
    let w = p.width;
    let s = b * SLOTS + j;
    if j != NONE && p.access != 0u {
        if p.policy == LRU {
            // kv_kernels::ops::cache::lru_score(clock, base + i).
            let lru0 = (u64(p.lru0_hi) << 32u) | u64(p.lru0_lo);
            atomicMax(&tscores[s], lru0 + u64(p.base + i));
        } else if p.policy == LFU {
            atomicAdd(&tscores[s], 1lu);
        }
    }
    if p.want_rows != 0u {
        for (var k = 0u; k < w; k += 1u) {
            var v = 0lu;
            if j != NONE { v = trows[s * w + k]; }
            bout[sec_row(i) + k] = v;
        }
    }
    b32[i] = select(0u, 1u, j != NONE);
}

// Take (p.want_rows = 1) or delete of item i; the batch's keys are distinct.
@compute @workgroup_size(WG)
fn kc_take(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = item(wid, nwg, lid);
    if i >= p.n { return; }
    let b = b32[sec_bucket(i)];
    let j = find(b, bin[i]);
    var taken = false;
    if j != NONE {
        let bit = 1u << j;
        taken = (atomicAnd(&tused[b], ~bit) & bit) != 0u;
    }
    let s = b * SLOTS + j;
    if p.want_rows != 0u {
        let w = p.width;
        for (var k = 0u; k < w; k += 1u) {
            var v = 0lu;
            if taken { v = trows[s * w + k]; }
            bout[sec_row(i) + k] = v;
        }
        var e = 0lu;
        if taken { e = texp[s]; }
        bout[sec_exp(i)] = e;
    }
    b32[i] = select(0u, 1u, taken);
}

var<workgroup> wg_live: atomic<u32>;

// Live entries of the buckets 0 .. p.n into ctl[C_LIVE].
@compute @workgroup_size(WG)
fn kc_count(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = item(wid, nwg, lid);
    if b < p.n {
        let used = atomicLoad(&tused[b]);
        var live = 0u;
        for (var j = 0u; j < SLOTS; j += 1u) {
            if ((used >> j) & 1u) != 0u && !expired(texp[b * SLOTS + j]) { live += 1u; }
        }
        if live != 0u { atomicAdd(&wg_live, live); }
    }
    workgroupBarrier();
    if lid == 0u {
        let c = atomicLoad(&wg_live);
        if c != 0u { atomicAdd(&ctl[C_LIVE], u64(c)); }
    }
}
"#;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use wgpu::naga;

    /// Parses and validates a module as wgpu would, with the features the backend requires.
    pub(crate) fn validate(src: &str) {
        let module = naga::front::wgsl::parse_str(src)
            .unwrap_or_else(|e| panic!("{}\n{src}", e.emit_to_string(src)));
        let caps = naga::valid::Capabilities::SHADER_INT64
            | naga::valid::Capabilities::SHADER_INT64_ATOMIC_ALL_OPS;
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
            .validate(&module)
            .unwrap_or_else(|e| panic!("{}\n{src}", e.emit_to_string(src)));
    }

    #[test]
    fn every_generated_module_validates() {
        for segs in 1..=8 {
            for flavour in [Flavour::AtomicKeys, Flavour::Plain] {
                validate(&batch_module(segs, flavour));
            }
            validate(&rehash_module(segs));
        }
        validate(&cache_module());
    }

    #[test]
    fn every_segment_has_a_case() {
        let src = batch_module(3, Flavour::AtomicKeys);
        for s in 0..3 {
            assert!(src.contains(&format!(
                "case {s}u: {{ return atomicLoad(&keys{s}[off]); }}"
            )));
        }
    }
}

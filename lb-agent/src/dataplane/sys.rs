//! The `bpf()` calls aya does not make (batch update and lookup), reading per-CPU values out
//! of a batch buffer, and the clock the data plane's timestamps use. With `crate::sys`, the
//! only `unsafe` of the agent; every block says why it is sound.
#![allow(
    unsafe_code,
    reason = "the one module of the data plane that makes raw bpf() calls"
)]

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::maps::{MapData, MapType};

/// `bpf_attr` of the `BPF_MAP_*_BATCH` commands.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Runs `bpf()` command `cmd` on `attr`; its non-negative result (a descriptor for some
/// commands).
///
/// # Safety
/// `attr` must be a valid `bpf_attr` for `cmd`: every pointer in it valid for what the
/// command does with it (for the batch commands: `keys` and `values` sized for `count` entries
/// of the map's key and value sizes, the cursors `u32`s or null), all outliving the call.
unsafe fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
    // SAFETY: the caller's contract; `attr` is a bpf_attr of its size.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<A>()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The bytes one entry takes in a batch buffer: (key, value). Per-CPU maps hold one value
/// per possible CPU, each rounded up to 8 bytes.
pub fn entry_sizes(map: &MapData) -> io::Result<(usize, usize)> {
    let info = map.info().map_err(io::Error::other)?;
    let per_cpu = matches!(
        info.map_type(),
        Ok(MapType::PerCpuArray | MapType::PerCpuHash | MapType::LruPerCpuHash)
    );
    let value = info.value_size() as usize;
    let value = if per_cpu {
        let cpus =
            aya::util::nr_cpus().map_err(|(what, e)| io::Error::other(format!("{what}: {e}")))?;
        value.next_multiple_of(8) * cpus
    } else {
        value
    };
    Ok((info.key_size() as usize, value))
}

/// `BPF_MAP_UPDATE_BATCH` of `values` at keys `first..` of a `u32 → u32` map, in one call.
pub fn update_batch(map: &MapData, first: u32, values: &[u32]) -> io::Result<()> {
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    if entry_sizes(map)? != (4, 4) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "update_batch writes u32 → u32 maps only",
        ));
    }
    let keys: Vec<u32> = (first..).take(values.len()).collect();
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: values.len() as u32,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: `keys` and `values` hold `count` u32s each, the map's key and value size
    // (checked above), and outlive the call.
    unsafe { bpf(BPF_MAP_UPDATE_BATCH, &mut attr)? };
    if attr.count as usize != values.len() {
        return Err(io::Error::other(format!(
            "wrote {} of {} entries",
            attr.count,
            values.len()
        )));
    }
    Ok(())
}

/// `BPF_MAP_LOOKUP_BATCH`: up to `count` entries after the cursor `in_batch` (from the start
/// when `None`) into `keys` and `values` (per-CPU maps: every CPU's value of an entry in a
/// row); the next cursor goes to `out_batch`. Returns how many entries came and whether the
/// map has no more. Buffers too small for `count` entries are refused.
pub fn lookup_batch(
    map: &MapData,
    in_batch: Option<u32>,
    out_batch: &mut u32,
    keys: &mut [u8],
    values: &mut [u8],
    count: u32,
) -> io::Result<(u32, bool)> {
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    let (key_size, value_size) = entry_sizes(map)?;
    let n = count as usize;
    if keys.len() < n * key_size || values.len() < n * value_size {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "batch buffers of {} and {} bytes cannot hold {count} entries of {key_size} and {value_size}",
                keys.len(),
                values.len()
            ),
        ));
    }
    let cursor = in_batch.unwrap_or(0);
    let mut attr = BatchAttr {
        in_batch: if in_batch.is_some() {
            (&raw const cursor) as u64
        } else {
            0
        },
        out_batch: std::ptr::from_mut(out_batch) as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: `keys` and `values` hold `count` entries of the map's key and value sizes
    // (checked above against the kernel's own sizes); the cursors are u32s (the batch token
    // of arrays and hash maps alike); all outlive the call.
    match unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) } {
        Ok(_) => Ok((attr.count, false)),
        // ENOENT: the walk reached the end (`count` says how many came before it).
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok((attr.count, true)),
        Err(e) => Err(e),
    }
}

/// The `T` at the start of `bytes` (a value out of a batch buffer).
///
/// # Panics
/// When `bytes` is shorter than a `T`.
pub fn read_value<T: aya::Pod>(bytes: &[u8]) -> T {
    let bytes = &bytes[..size_of::<T>()];
    // SAFETY: `bytes` holds size_of::<T>() bytes; T is Pod (every bit pattern is a valid
    // T); read_unaligned needs no alignment.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

/// `CLOCK_MONOTONIC` in nanoseconds: `bpf_ktime_get_ns()`'s clock.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write into; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The interface the BPF link (XDP or TCX) pinned at `path` is attached to: `bpf_link_info`'s
/// `ifindex`, 0 when the interface is gone (the link is then defunct).
pub fn pinned_link_ifindex(path: &std::path::Path) -> io::Result<u32> {
    let fd = obj_get(path)?;
    link_ifindex(std::os::fd::AsFd::as_fd(&fd))
}

/// The object pinned at `path` (`BPF_OBJ_GET`).
fn obj_get(path: &std::path::Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    const BPF_OBJ_GET: libc::c_long = 7;
    #[repr(C)]
    struct GetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = GetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: `attr` is a valid bpf_attr for the command, its path a NUL-terminated string
    // that outlives the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut attr) }?;
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Detaches the BPF link pinned at `path` from its interface (`BPF_LINK_DETACH`), whoever
/// else holds it.
pub fn detach_pinned_link(path: &std::path::Path) -> io::Result<()> {
    const BPF_LINK_DETACH: libc::c_long = 34;
    let fd = obj_get(path)?;
    #[repr(C)]
    struct DetachAttr {
        link_fd: u32,
    }
    let mut attr = DetachAttr {
        link_fd: fd.as_raw_fd() as u32,
    };
    // SAFETY: `attr` is a valid bpf_attr for the command (no pointers).
    unsafe { bpf(BPF_LINK_DETACH, &mut attr) }.map(drop)
}

/// The interface a BPF link (XDP or TCX) is attached to (see [`pinned_link_ifindex`]).
fn link_ifindex(link: std::os::fd::BorrowedFd<'_>) -> io::Result<u32> {
    let info = link_info(link)?;
    Ok(u32::from_ne_bytes([info[16], info[17], info[18], info[19]]))
}

/// `struct bpf_link_info` of a link: type, id, prog_id, then a union aligned to 8 (an XDP or
/// TCX link's starts with the ifindex, a cgroup link's with the cgroup id). The kernel copies
/// at most its own size.
fn link_info(link: std::os::fd::BorrowedFd<'_>) -> io::Result<[u8; 128]> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = [0u8; 128];
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: `attr` is a valid bpf_attr for the command; `info` is a writable buffer of
    // `info_len` bytes that outlives the call.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok(info)
}

/// The cgroup (its id: the inode number of its directory) that the BPF link pinned at `path`
/// is attached to, with the link's descriptor; id 0 when the cgroup is gone.
pub fn pinned_cgroup_link(path: &std::path::Path) -> io::Result<(u64, std::os::fd::OwnedFd)> {
    let fd = obj_get(path)?;
    let info = link_info(fd.as_fd())?;
    let mut id = [0u8; 8];
    id.copy_from_slice(&info[16..24]);
    Ok((u64::from_ne_bytes(id), fd))
}

/// Replaces the program of link `link` with `prog` in one step (`BPF_LINK_UPDATE`).
pub fn link_update(
    link: std::os::fd::BorrowedFd<'_>,
    prog: std::os::fd::BorrowedFd<'_>,
) -> io::Result<()> {
    const BPF_LINK_UPDATE: libc::c_long = 29;
    #[repr(C)]
    struct UpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = UpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: `attr` is a valid bpf_attr for the command (no pointers).
    unsafe { bpf(BPF_LINK_UPDATE, &mut attr) }.map(drop)
}

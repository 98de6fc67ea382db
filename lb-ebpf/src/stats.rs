//! Per-CPU counters. Array lookups on per-CPU arrays are inlined by the verifier, so each
//! update is a few instructions and needs no atomics.

use lb_common::{datapath_stat, drop_reason};

use crate::{BACKEND_STATS, DATAPATH_STATS, SERVICE_STATS};

#[inline(always)]
pub fn drop(service_id: u32, reason: u32) {
    if let Some(s) = SERVICE_STATS.get_ptr_mut(service_id) {
        let slot = (reason as usize) & (drop_reason::SLOTS - 1);
        unsafe { (*s).drops[slot] += 1 };
    }
}

/// A client → backend packet of `bytes` (IP length) forwarded for a service and backend.
#[inline(always)]
pub fn packet_in(service_id: u32, backend_id: u32, bytes: u32) {
    if let Some(s) = SERVICE_STATS.get_ptr_mut(service_id) {
        unsafe {
            (*s).packets_in += 1;
            (*s).bytes_in += bytes as u64;
        }
    }
    if let Some(b) = BACKEND_STATS.get_ptr_mut(backend_id) {
        unsafe {
            (*b).packets_in += 1;
            (*b).bytes_in += bytes as u64;
        }
    }
}

/// A backend → client reply of `bytes` (IP length) after reverse NAT.
#[inline(always)]
pub fn packet_out(service_id: u32, backend_id: u32, bytes: u32) {
    packets_out(service_id, backend_id, 1, bytes as u64);
}

/// `packets` backend → client replies of `bytes` (IP lengths) in all (a GSO super-packet).
#[inline(always)]
pub fn packets_out(service_id: u32, backend_id: u32, packets: u32, bytes: u64) {
    if let Some(s) = SERVICE_STATS.get_ptr_mut(service_id) {
        unsafe {
            (*s).packets_out += packets as u64;
            (*s).bytes_out += bytes;
        }
    }
    if let Some(b) = BACKEND_STATS.get_ptr_mut(backend_id) {
        unsafe {
            (*b).packets_out += packets as u64;
            (*b).bytes_out += bytes;
        }
    }
}

#[inline(always)]
pub fn new_flow(service_id: u32, backend_id: u32) {
    if let Some(s) = SERVICE_STATS.get_ptr_mut(service_id) {
        unsafe { (*s).new_flows += 1 };
    }
    if let Some(b) = BACKEND_STATS.get_ptr_mut(backend_id) {
        unsafe { (*b).new_flows += 1 };
    }
}

#[inline(always)]
pub fn datapath(slot: usize) {
    if let Some(d) = DATAPATH_STATS.get_ptr_mut(0) {
        unsafe { (*d).counters[slot & (datapath_stat::SLOTS - 1)] += 1 };
    }
}

// CVFIO: what Swift's VFIO module needs from <linux/vfio.h> and cannot import by itself.
//
// Swift imports the header's structs and its plain constants (VFIO_TYPE1v2_IOMMU,
// VFIO_REGION_INFO_FLAG_MMAP, ...), but not the ioctl request numbers (function-like _IO
// macros), not ioctl(2) itself (variadic), and not the offsets of flexible array members.
// Everything here is static inline, so it costs no call and needs nothing in shim.c.
#ifndef OUTBOARD_CVFIO_H
#define OUTBOARD_CVFIO_H

#include <stddef.h>
#include <stdint.h>
#include <linux/vfio.h>

// ioctl(2) with a pointer argument and with an integer argument; -1 with errno on failure.
// Declared here with plain types (not through <sys/ioctl.h>, which Swift's Glibc module
// imports as a variadic function it cannot call).
extern int ioctl(int fd, unsigned long request, ...);
static inline int ob_vfio_ioctl_ptr(int fd, unsigned long request, void *arg) { return ioctl(fd, request, arg); }
static inline int ob_vfio_ioctl_int(int fd, unsigned long request, unsigned long arg) { return ioctl(fd, request, arg); }
static inline int ob_vfio_ioctl_none(int fd, unsigned long request) { return ioctl(fd, request); }

// The request numbers of the VFIO ioctls Outboard makes.
static inline unsigned long ob_vfio_req_get_api_version(void) { return VFIO_GET_API_VERSION; }
static inline unsigned long ob_vfio_req_check_extension(void) { return VFIO_CHECK_EXTENSION; }
static inline unsigned long ob_vfio_req_set_iommu(void) { return VFIO_SET_IOMMU; }
static inline unsigned long ob_vfio_req_group_get_status(void) { return VFIO_GROUP_GET_STATUS; }
static inline unsigned long ob_vfio_req_group_set_container(void) { return VFIO_GROUP_SET_CONTAINER; }
static inline unsigned long ob_vfio_req_group_unset_container(void) { return VFIO_GROUP_UNSET_CONTAINER; }
static inline unsigned long ob_vfio_req_group_get_device_fd(void) { return VFIO_GROUP_GET_DEVICE_FD; }
static inline unsigned long ob_vfio_req_device_get_info(void) { return VFIO_DEVICE_GET_INFO; }
static inline unsigned long ob_vfio_req_device_get_region_info(void) { return VFIO_DEVICE_GET_REGION_INFO; }
static inline unsigned long ob_vfio_req_device_get_irq_info(void) { return VFIO_DEVICE_GET_IRQ_INFO; }
static inline unsigned long ob_vfio_req_device_set_irqs(void) { return VFIO_DEVICE_SET_IRQS; }
static inline unsigned long ob_vfio_req_device_reset(void) { return VFIO_DEVICE_RESET; }
static inline unsigned long ob_vfio_req_iommu_get_info(void) { return VFIO_IOMMU_GET_INFO; }
static inline unsigned long ob_vfio_req_iommu_map_dma(void) { return VFIO_IOMMU_MAP_DMA; }
static inline unsigned long ob_vfio_req_iommu_unmap_dma(void) { return VFIO_IOMMU_UNMAP_DMA; }

// Layouts the Swift side builds and parses as bytes (flexible array members).
/// Where the eventfds start in struct vfio_irq_set.
static inline size_t ob_vfio_irq_set_data_offset(void) { return offsetof(struct vfio_irq_set, data); }
/// Where the ranges start in the IOVA-range capability.
static inline size_t ob_vfio_iova_range_cap_ranges_offset(void) { return offsetof(struct vfio_iommu_type1_info_cap_iova_range, iova_ranges); }
/// Where the areas start in the sparse-mmap capability.
static inline size_t ob_vfio_sparse_mmap_cap_areas_offset(void) { return offsetof(struct vfio_region_info_cap_sparse_mmap, areas); }

/// A full barrier: every earlier load and store (to normal memory and MMIO) is globally
/// visible before any later one (MFENCE on x86-64). For a driver that writes a descriptor
/// in DMA memory and then rings a doorbell in a BAR.
static inline void ob_mmio_full_barrier(void) { __sync_synchronize(); }

#endif

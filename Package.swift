// swift-tools-version:6.1
import PackageDescription

// Layers (the team DESIGN.md; queues in docs/rings.md): C shim -> syscalls -> rings (no syscalls) -> ... -> CLI.
let package = Package(
    name: "outboard",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "outboard", targets: ["outboard"]),
        .library(name: "OutboardSystem", targets: ["OutboardSystem"]),
        .library(name: "OutboardRings", targets: ["OutboardRings"]),
        .library(name: "OutboardSession", targets: ["OutboardSession"]),
        .library(name: "Outboard", targets: ["Outboard"]),
        .library(name: "Virtualizers", targets: ["Virtualizers"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
    ],
    targets: [
        // Linux facts Swift cannot import directly: memfd, eventfd, pidfd, cmsg macros,
        // ioctl numbers, volatile MMIO.
        .target(name: "CLinux"),
        // Every syscall Outboard makes, typed and throwing.
        .target(
            name: "OutboardSystem",
            dependencies: ["CLinux", .product(name: "SystemPackage", package: "swift-system")]
        ),
        // A compiler-only barrier (a signal fence), which Swift's Synchronization lacks.
        .target(name: "COrdering"),
        // Shared-memory queues. No syscalls, no classes, no allocation per descriptor.
        .target(name: "OutboardRings", dependencies: ["COrdering"]),
        // Session protocol: control messages, block queues, translation table, shared pages,
        // the serving end of a session.
        .target(name: "OutboardSession", dependencies: ["OutboardRings", "OutboardSystem"]),
        // Virtio 1.2 spec structures, the split virtqueue (driver side) and the transport
        // seam (VirtioTransport). No syscalls.
        .target(name: "Virtio", dependencies: ["OutboardRings"]),
        // The vhost-user frontend (driver-role) transport over a connected Unix stream socket.
        .target(
            name: "VhostUser",
            dependencies: ["OutboardSystem", "OutboardRings", "Virtio", "CLinux", .product(name: "SystemPackage", package: "swift-system")]
        ),
        // VFIO (linux/vfio.h): container, group and device, regions and BARs, PCI config
        // space, MSI-X to eventfds, DMA map and unmap; PCI binding through sysfs.
        .target(
            name: "VFIO",
            dependencies: ["OutboardSystem", "OutboardRings", "CLinux", .product(name: "SystemPackage", package: "swift-system")]
        ),
        // The virtio-pci transport (virtio 1.2 §4.1, modern devices) over a PCI function.
        .target(name: "VirtioPCI", dependencies: ["VFIO", "Virtio", "OutboardRings", "OutboardSystem", "CLinux", "COrdering"]),
        // Drivers: the processes the manager spawns and sandboxes.
        .target(
            name: "Drivers",
            dependencies: ["OutboardSession", "OutboardRings", "OutboardSystem", "CLinux", "Virtio", "VhostUser", "VFIO", "VirtioPCI",
                           .product(name: "Logging", package: "swift-log")]
        ),
        // The manager: config, control socket, sessions, translation tables, supervision.
        .target(
            name: "Manager",
            dependencies: ["OutboardSession", "OutboardRings", "OutboardSystem", "CLinux", "VFIO",
                           .product(name: "Logging", package: "swift-log")]
        ),
        // The client library applications import: block sessions, reissue after a driver
        // restart, the admin client.
        .target(name: "Outboard", dependencies: ["OutboardSession", "OutboardRings", "OutboardSystem"]),
        // Virtualizers: client of one session and server of others at once (the block
        // partitioner), built on the client library and the session layer's resources.
        .target(name: "Virtualizers", dependencies: ["Outboard", "OutboardSession", "OutboardRings", "OutboardSystem"]),
        // Bridges: clients that expose an Outboard device to ordinary programs (a net
        // session as a TAP interface).
        .target(name: "Bridges", dependencies: ["Outboard", "OutboardSession", "OutboardSystem",
                                                .product(name: "SystemPackage", package: "swift-system")]),
        // The C reference queue the ring benchmark measures Outboard against: same layout,
        // same algorithm, same work per descriptor.
        .target(name: "CRefRing"),
        // The C reference for `bench blk`: a minimal single-process vhost-user-blk frontend.
        .target(name: "CRefBlk"),
        // Ring workers (Swift and C) as separate processes, and the harness that runs them.
        .target(
            name: "OutboardBench",
            dependencies: ["OutboardSystem", "OutboardRings", "CRefRing", "CRefBlk", "CLinux"]
        ),
        .executableTarget(
            name: "outboard",
            dependencies: [
                "OutboardBench", "OutboardSystem", "OutboardSession", "Outboard", "Manager", "Drivers", "VFIO", "CLinux",
                "OutboardRings", "Virtualizers", "Bridges",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        // Shared by the test targets that run the `outboard` executable.
        .target(name: "OutboardTestSupport", dependencies: ["Outboard", "OutboardBench", "OutboardSession", "OutboardSystem", "OutboardRings", "Virtio"],
                path: "Tests/OutboardTestSupport"),
        .testTarget(name: "OutboardSystemTests", dependencies: ["OutboardSystem", "CLinux", "OutboardTestSupport"]),
        .testTarget(name: "OutboardRingsTests", dependencies: ["OutboardRings", "OutboardTestSupport"]),
        .testTarget(name: "VirtioTests", dependencies: ["Virtio", "OutboardRings", "OutboardTestSupport"]),
        // Against a real qemu-storage-daemon, and a hostile backend double.
        // VFIO and virtio-pci pieces the host can check (parsing, layouts, binding over a
        // sysfs tree); the devices themselves are tested in the guest lane.
        .testTarget(name: "VFIOTests", dependencies: ["VFIO", "VirtioPCI", "Virtio", "CLinux", "OutboardTestSupport"]),
        // The virtio-pci transport over an in-process PCI function double (a modern
        // virtio-pci device's registers in trapped memory).
        .testTarget(name: "VirtioPCITests", dependencies: ["VirtioPCI", "VFIO", "Virtio", "OutboardRings", "OutboardSystem",
                                                           "CLinux", "Drivers", "OutboardTestSupport"]),
        .testTarget(name: "VhostUserTests", dependencies: ["VhostUser", "Virtio", "OutboardSystem", "CLinux", "OutboardTestSupport"]),
        .testTarget(name: "OutboardSessionTests", dependencies: ["OutboardSession", "OutboardRings", "OutboardSystem"]),
        // End to end: a manager process, sandboxed drivers, clients, faults.
        .testTarget(
            name: "ManagerTests",
            dependencies: ["Manager", "Outboard", "OutboardSession", "OutboardSystem", "OutboardRings", "OutboardTestSupport", "VFIO"]
        ),
        // The drivers, as the manager runs them: the virtio-blk driver against a real
        // qemu-storage-daemon (the memory driver serves the manager's and client tests).
        .testTarget(
            name: "DriversTests",
            dependencies: ["Outboard", "OutboardSession", "OutboardSystem", "OutboardBench", "OutboardTestSupport",
                           "Drivers", "Virtio", "VhostUser", "OutboardRings"]
        ),
        // The client library against a real manager: sessions, the admin client.
        .testTarget(
            name: "OutboardTests",
            dependencies: ["Outboard", "OutboardSession", "OutboardSystem", "OutboardRings", "OutboardTestSupport"]
        ),
        // Virtualizers against a real manager: the partitioner chains sessions.
        .testTarget(
            name: "VirtualizersTests",
            dependencies: ["Virtualizers", "Outboard", "OutboardBench", "OutboardSession", "OutboardSystem", "OutboardRings",
                           "OutboardTestSupport"]
        ),
        // Inside a QEMU guest with an IOMMU (scripts/guest-lane.sh): what the VFIO tests and
        // the benchmark rely on there.
        .testTarget(name: "GuestLaneTests", dependencies: ["OutboardTestSupport", "OutboardSystem"]),
        // DPDK's testpmd as the network class's peer: the vhost-user-net device and the
        // virtio-user reference of `bench net`.
        .testTarget(name: "NetPeerTests", dependencies: ["OutboardBench", "OutboardSystem", "OutboardTestSupport"]),
        .testTarget(name: "NetTests", dependencies: ["Outboard", "OutboardBench", "OutboardSession", "OutboardSystem", "OutboardTestSupport"]),
        // Cross-process tests: they spawn the `outboard` executable's worker processes.
        .testTarget(
            name: "OutboardBenchTests",
            dependencies: ["OutboardBench", "OutboardSystem", "OutboardRings", "OutboardTestSupport"]
        ),
    ]
)

import CLinux
import Foundation
import OutboardSystem
import OutboardTestSupport
import SystemPackage
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Whether interface `name` exists in the caller's network namespace.
func linkExists(_ name: String) -> Bool { access("/sys/class/net/\(name)", F_OK) == 0 }

/// Whether interface `name` is gone within a test deadline. Not at once: a process that
/// another test is spawning holds a copy of every descriptor between its fork and its
/// exec, and the interface goes only with the last one.
func linkGoes(_ name: String) -> Bool {
    let deadline = Clock.monotonicNanoseconds + UInt64(testDeadlineSeconds * 1e9)
    while linkExists(name) {
        guard Clock.monotonicNanoseconds < deadline else { return false }
        usleep(1000)
    }
    return true
}

/// `ip -o link show dev NAME` in the caller's namespace.
func linkLine(_ name: String) throws -> String { try runChecked(ipTool!, ["-o", "link", "show", "dev", name]).output }

/// The address on the TAP's subnet the kernel pings, answered from Swift, and the kernel's
/// own address on the TAP (TEST-NET-1, RFC 5737: in a namespace of their own).
let kernelIP = IPv4Address(192, 0, 2, 1)
let swiftIP = IPv4Address(192, 0, 2, 2)

/// A locally administered unicast MAC address with the pid in it, `tag` last.
func testMAC(_ tag: UInt8) -> MACAddress {
    let p = UInt32(bitPattern: getpid())
    return MACAddress(0x02, UInt8(p >> 24 & 255), UInt8(p >> 16 & 255), UInt8(p >> 8 & 255), UInt8(p & 255), tag)
}

/// A host on the far end of a TAP, played in Swift: it answers ARP requests for its IPv4
/// address and ICMP echo requests to it, checking each against what the kernel must send.
struct FarHost {
    let mac: MACAddress
    let ip: IPv4Address
    /// The kernel's end: the TAP interface's MAC and address.
    let peerMAC: MACAddress
    let peerIP: IPv4Address
    var arpAnswered = 0
    var echoSequences: [UInt16] = []
    var ignored = 0
    var problems: [String] = []

    /// The reply to `frame`, if it is one this host answers.
    mutating func answer(_ frame: [UInt8]) -> [UInt8]? {
        guard let eth = EthernetFrame(parsing: frame) else { problems.append("unparsable frame of \(frame.count) bytes"); return nil }
        switch eth.etherType {
        case EtherType.arp:
            guard let arp = ARPPacket(parsing: eth.payload) else { problems.append("unparsable ARP"); return nil }
            guard arp.operation == ARPPacket.request, arp.targetIP == ip else { ignored += 1; return nil }
            if arp.senderMAC != peerMAC || arp.senderIP != peerIP || eth.source != peerMAC {
                problems.append("ARP request from \(arp.senderMAC) \(arp.senderIP) (frame from \(eth.source))")
            }
            arpAnswered += 1
            let reply = ARPPacket(operation: ARPPacket.reply, senderMAC: mac, senderIP: ip, targetMAC: arp.senderMAC, targetIP: arp.senderIP)
            return EthernetFrame(destination: arp.senderMAC, source: mac, etherType: EtherType.arp, payload: reply.bytes).bytes
        case EtherType.ipv4:
            let ipPacket: IPv4Packet
            switch IPv4Packet.parse(eth.payload) {
            case .success(let p): ipPacket = p
            case .failure(let why): problems.append("IPv4 refused: \(why)"); return nil
            }
            guard ipPacket.destination == ip, ipPacket.protocol == IPv4Packet.icmp else { ignored += 1; return nil }
            guard let echo = ICMPEcho(parsing: ipPacket.payload), echo.type == ICMPEcho.request else {
                problems.append("ICMP to \(ip) that is not a well-formed echo request"); return nil
            }
            if eth.destination != mac || eth.source != peerMAC || ipPacket.source != peerIP {
                problems.append("echo request \(eth.source) -> \(eth.destination), from \(ipPacket.source)")
            }
            echoSequences.append(echo.sequence)
            let icmp = ICMPEcho(type: ICMPEcho.reply, identifier: echo.identifier, sequence: echo.sequence, data: echo.data)
            let packet = IPv4Packet(source: ip, destination: ipPacket.source, protocol: IPv4Packet.icmp,
                                    identification: ipPacket.identification, payload: icmp.bytes)
            return EthernetFrame(destination: eth.source, source: mac, etherType: EtherType.ipv4, payload: packet.bytes).bytes
        default:
            ignored += 1  // IPv6 neighbour discovery and MLD, which the kernel sends on its own
            return nil
        }
    }
}

/// The Errno `body` threw, or nil if it threw none.
func errnoOf(_ body: () throws(Errno) -> Void) -> Errno? {
    do { try body(); return nil } catch { return error }
}

/// Writes `bytes` as one frame through `TapDevice.write` (copied into a buffer first: a
/// closure cannot capture the borrowed device).
func send(_ bytes: [UInt8], to tap: borrowing TapDevice) throws(Errno) {
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(bytes.count, 1), alignment: 16)
    defer { buffer.deallocate() }
    buffer.copyBytes(from: bytes)
    try tap.write(UnsafeRawBufferPointer(rebasing: buffer[0..<bytes.count]))
}

@Suite(.enabled(if: canUseNetworkNamespaces, "needs root, /dev/net/tun, iproute2 and iputils-ping (scripts/setup.sh)"))
struct TapTests {
    @Test func kernelChosenAndPatternNames() throws {
        var name = ""
        do {
            let tap = try TapDevice()
            name = tap.name
            let current = try tap.currentName(), here = try tap.isInCurrentNamespace()
            #expect(!name.isEmpty && name.utf8.count <= TapDevice.maxNameLength)
            #expect(linkExists(name))
            #expect(current == name)
            #expect(here)
        }
        #expect(linkGoes(name), "the interface goes away with its descriptor")

        let prefix = uniqueLinkName("p")
        let patterned = try TapDevice(name: prefix + "-%d")
        let filled = patterned.name
        #expect(filled.hasPrefix(prefix + "-") && Int(filled.dropFirst(prefix.count + 1)) != nil, "\(filled)")
        #expect(linkExists(filled))
    }

    @Test func refusals() throws {
        let long = errnoOf { () throws(Errno) in _ = try TapDevice(name: String(repeating: "x", count: TapDevice.maxNameLength + 1)) }
        #expect(long == .invalidArgument)
        let tap = try TapDevice(name: uniqueLinkName())
        let name = tap.name
        let taken = errnoOf { () throws(Errno) in _ = try TapDevice(name: name) }
        #expect(taken == .resourceBusy, "the name is taken")

        // Down: nothing to read, and the kernel takes no frames.
        let upAtFirst = try tap.isUp()
        #expect(!upAtFirst)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 2048, alignment: 16)
        defer { buffer.deallocate() }
        let got = try tap.read(into: buffer)
        #expect(got == nil)
        let arp = ARPPacket(operation: ARPPacket.request, senderMAC: testMAC(1), senderIP: swiftIP,
                            targetMAC: MACAddress(0, 0, 0, 0, 0, 0), targetIP: kernelIP)
        let frame = EthernetFrame(destination: .broadcast, source: testMAC(1), etherType: EtherType.arp, payload: arp.bytes).bytes
        var e: Errno? = nil
        do { try send(frame, to: tap) } catch { e = error }
        #expect(e == .ioError, "down")
        try tap.setUp()
        try send(frame, to: tap)
        e = nil
        do { try send(Array(frame.prefix(EthernetFrame.headerBytes - 1)), to: tap) } catch { e = error }
        #expect(e == .invalidArgument, "shorter than an Ethernet header")

        e = nil
        do { try tap.setMACAddress(MACAddress(0x03, 0, 0, 0, 0, 1)) } catch { e = error }
        #expect(e == .addressNotAvailable, "multicast")
        e = nil
        do { try tap.setMACAddress(MACAddress(0, 0, 0, 0, 0, 0)) } catch { e = error }
        #expect(e == .addressNotAvailable, "all zero")
        let mtu = try tap.mtu()
        e = nil
        do { try tap.setMTU(67) } catch { e = error }
        #expect(e == .invalidArgument, "below ETH_MIN_MTU")
        e = nil
        do { try tap.setMTU(1 << 20) } catch { e = error }
        #expect(e == .invalidArgument, "above the TAP's maximum")
        let after = try tap.mtu()
        #expect(after == mtu)
    }

    @Test func addressMTUAndFlagsAsTheKernelSeesThem() throws {
        let tap = try TapDevice(name: uniqueLinkName())
        let name = tap.name
        let mac = testMAC(2)
        try tap.setMACAddress(mac)
        let readBack = try tap.macAddress()
        #expect(readBack == mac)
        let mtu = try tap.mtu() - 100
        try tap.setMTU(mtu)
        let mtuBack = try tap.mtu()
        #expect(mtuBack == mtu)
        try tap.setUp()
        let up = try tap.isUp()
        #expect(up)
        let line = try linkLine(name)
        #expect(line.contains("link/ether \(mac) "), "\(line)")
        #expect(line.contains(" mtu \(mtu) "), "\(line)")
        #expect(line.contains(",UP"), "\(line)")
        // Live: the address changes while the interface is up.
        let second = testMAC(3)
        try tap.setMACAddress(second)
        let changed = try linkLine(name)
        #expect(changed.contains("link/ether \(second) "), "\(changed)")
        try tap.setUp(false)
        let down = try tap.isUp(), downLine = try linkLine(name)
        #expect(!down)
        #expect(!downLine.contains(",UP"), "\(downLine)")
    }

    /// The kernel pings an address on the TAP's subnet from a namespace of its own; Swift
    /// reads the ARP request and the echo requests from the descriptor and writes the ARP
    /// reply and the echo replies, so that `ping -c 3` succeeds.
    @Test func pingAnsweredFromSwift() throws {
        let tap = try TapDevice(name: uniqueLinkName())
        let name = tap.name
        let tapMAC = testMAC(4)
        try tap.setMACAddress(tapMAC)
        let mtu = try tap.mtu()
        let ns = try NetworkNamespace()
        try ns.moveLink(name)
        let here = try tap.isInCurrentNamespace()
        #expect(!here)
        #expect(!linkExists(name))
        var e: Errno? = nil
        do { _ = try tap.mtu() } catch { e = error }
        #expect(e == .operationNotSupportedByDevice, "MTU by name reaches only this namespace")
        let macThere = try tap.macAddress()
        #expect(macThere == tapMAC, "the descriptor reaches the device wherever it is")
        try ns.runChecked(["ip", "address", "add", "\(kernelIP)/24", "dev", name])
        try ns.runChecked(["ip", "link", "set", "dev", name, "up"])
        let line = try ns.runChecked(["ip", "-o", "link", "show", "dev", name]).output
        #expect(line.contains(" mtu \(mtu) "), "\(line)")

        var host = FarHost(mac: testMAC(5), ip: swiftIP, peerMAC: tapMAC, peerIP: kernelIP)
        let count = 3
        let ping = try ns.start(["ping", "-n", "-c", "\(count)", "-i", "0.2", "-w", "\(Int(testDeadlineSeconds))", "\(swiftIP)"])
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: mtu + 19, alignment: 16)
        defer { buffer.deallocate() }
        var frames = 0
        while ping.isRunning {
            guard try tap.fd.waitReadable(until: Clock.monotonicNanoseconds + 100_000_000) else { continue }
            while let n = try tap.read(into: buffer) {
                frames += 1
                if let reply = host.answer(Array(buffer[0..<n])) { try send(reply, to: tap) }
            }
        }
        let result = ping.finish()
        #expect(result.succeeded, "\(result)")
        #expect(result.output.contains("\(count) packets transmitted, \(count) received"), "\(result.output)")
        #expect(host.problems.isEmpty, "\(host.problems)")
        #expect(host.arpAnswered >= 1)
        #expect(host.echoSequences == Array(1...UInt16(count)), "\(host.echoSequences)")
        #expect(frames == host.arpAnswered + count + host.ignored)
    }

    /// A frame longer than the read buffer is refused (EMSGSIZE), not cut silently, and
    /// the next read gives the next whole frame.
    @Test func frameLongerThanTheBufferIsRefused() throws {
        let tap = try TapDevice(name: uniqueLinkName())
        let name = tap.name
        let ns = try NetworkNamespace()
        try ns.moveLink(name)
        try ns.runChecked(["ip", "address", "add", "\(kernelIP)/24", "dev", name])
        try ns.runChecked(["ip", "link", "set", "dev", name, "up"])
        // Unanswered: the kernel sends ARP request after ARP request until ping gives up.
        let ping = try ns.start(["ping", "-n", "-c", "1", "-w", "\(Int(testDeadlineSeconds))", "\(swiftIP)"])
        let deadline = Clock.monotonicNanoseconds + UInt64(testDeadlineSeconds * 1e9)
        let small = UnsafeMutableRawBufferPointer.allocate(byteCount: ARPPacket.bytes, alignment: 16)
        defer { small.deallocate() }
        let big = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 16)
        defer { big.deallocate() }
        var cutRefused: Errno? = nil, cut = false, wholeAfterCut: ARPPacket? = nil
        while wholeAfterCut == nil, try tap.fd.waitReadable(until: deadline) {
            if !cut {
                do { _ = try tap.read(into: small) } catch { cutRefused = error }
                cut = true
            } else if let n = try tap.read(into: big), let eth = EthernetFrame(parsing: Array(big[0..<n])),
                      eth.etherType == EtherType.arp {
                wholeAfterCut = ARPPacket(parsing: eth.payload)
            }
        }
        #expect(cut)
        #expect(cutRefused == .messageTooLong)
        #expect(wholeAfterCut?.targetIP == swiftIP && wholeAfterCut?.senderIP == kernelIP)
        _ = consume ping  // killed when it goes away
    }
}

@Suite(.enabled(if: canUseNetworkNamespaces, "needs root and iproute2"))
struct NetworkNamespaceTests {
    @Test func createRunMoveDelete() throws {
        var name = ""
        do {
            let ns = try NetworkNamespace()
            name = ns.name
            #expect(access("/run/netns/\(name)", F_OK) == 0)
            let links = try ns.runChecked(["ip", "-o", "link", "show"]).output
            #expect(links.contains("lo:") && links.contains("UP"), "\(links)")
            #expect(!links.contains("eth0"), "a namespace of its own")
            let failed = try ns.run(["false"])
            #expect(failed.status == 1 && !failed.succeeded)
            let slow = try ns.run(["sleep", "30"], seconds: 0.5)
            #expect(slow.timedOut)
        }
        #expect(access("/run/netns/\(name)", F_OK) != 0, "deleted when its value goes away")
    }
}

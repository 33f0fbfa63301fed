import OutboardRings
import OutboardSession
import OutboardSystem
import Testing

/// Deterministic generator (SplitMix64), so a failing case can be replayed from its seed.
struct Generator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    mutating func below(_ n: Int) -> Int { Int(next() % UInt64(max(n, 1))) }
    mutating func string(max: Int) -> String {
        let alphabet = Array("abcdefghijklmnopqrstuvwxyz0123456789-_é日")
        return String((0..<below(max + 1)).map { _ in alphabet[below(alphabet.count)] })
    }

    /// A random valid message of every type.
    mutating func message() -> ControlMessage {
        switch below(19) {
        case 0: return .openSession(OpenSession(device: string(max: 20), deviceClass: .block, writable: next() & 1 == 0,
                                                dataBytes: next(), queueDepth: UInt32(truncatingIfNeeded: next())))
        case 1: return .statusRequest
        case 2: return .injectFault(device: string(max: 20), fault: FaultKind.allCases[below(FaultKind.allCases.count)], argument: next())
        case 3: return .sessionOpened(SessionOpened(sessionID: next(), generation: next(), queueDepth: 16, writable: true,
                                                    dataBytes: next(), classInfo: classInfo()))
        case 4: return .queuesReplaced(generation: next())
        case 5: return .sessionFailed(reason: string(max: 100))
        case 6: return .failure(ErrorCode.allCases[below(ErrorCode.allCases.count)], string(max: 100))
        case 7: return .statusReport("{\"devices\": [\n]}" + string(max: 300))
        case 8: return .faultInjected(generation: next(), pid: Int32(truncatingIfNeeded: next()))
        case 9: return .driverStart(DriverStart(device: string(max: 30), generation: next(), tableCapacity: 16, heartbeatIntervalMs: 20,
                                                transport: transport(),
                                                deviceClass: below(2) == 0
                                                    ? .block(BlockParameters(blockSize: 512, blockCount: next(), maxTransfer: 4096))
                                                    : .net(NetParameters(mac: MACAddress(rawValue: next()), mtu: UInt16(68 + below(8933))))))
        case 10: return .attach(Attach(sessionID: next(), tableIndex: 3, queueDepth: 32, writable: false, dataBytes: next()))
        case 11: return .detach(sessionID: next())
        case 12: return .driverReady(pid: 42, probes: (0..<below(10)).map { _ in string(max: 30) })
        case 13: return .attached(sessionID: next())
        case 14: return .detached(sessionID: next())
        case 15: return .deviceConnection(attempt: next())
        case 16: return .deviceInfo(classInfo())
        case 17: return .deviceLost(reason: string(max: 200), recovery: Recovery.allCases[below(Recovery.allCases.count)])
        default: return .sessionError(sessionID: next(), reason: string(max: 200))
        }
    }

    mutating func classInfo() -> ClassInfo {
        if below(3) == 0 {
            return .net(NetInfo(mac: MACAddress(rawValue: next()), mtu: UInt16(68 + below(8933)), linkUp: below(2) == 0))
        }
        return .block(BlockInfo(blockSize: 4096, blockCount: next(), maxTransfer: UInt32(truncatingIfNeeded: next()),
                         flags: DeviceFlags(rawValue: UInt32(below(16)))))
    }

    mutating func transport() -> TransportParameters {
        let v = VirtioParameters(queueSize: 256, notifyMode: NotifyMode.allCases[below(4)],
                                 pollMicroseconds: UInt32(below(1000)), dmaIOAddress: IOAddress(rawValue: next()))
        switch below(3) {
        case 0: return .memory(latencyMicroseconds: UInt32(truncatingIfNeeded: next()))
        case 1: return .vhostUser(v)
        default: return .vfio(v)
        }
    }
}

@Suite struct ControlProtocolTests {
    /// Every valid message decodes to itself.
    @Test func roundTrip() throws {
        var g = Generator(state: 1)
        for _ in 0..<20_000 {
            let m = g.message()
            let decoded = try ControlMessage.decode(m.encode(), limit: ControlProtocol.maxReportBytes)
            #expect(decoded == m)
        }
    }

    /// Property: for any bytes, decode either returns a message whose encoding is exactly
    /// those bytes, or throws. It never traps, never reads out of bounds, never accepts
    /// trailing or missing bytes. Inputs: random bytes, and valid messages mutated by bit
    /// flips, truncation, extension, and length/count fields set to extremes.
    @Test func decoderFuzz() {
        var g = Generator(state: 0xF0CC)
        var accepted = 0, rejected = 0
        for i in 0..<300_000 {
            var bytes: [UInt8]
            if i % 5 == 0 {
                bytes = (0..<g.below(64)).map { _ in UInt8(truncatingIfNeeded: g.next()) }
                if g.below(2) == 0 && bytes.count >= 8 {  // a valid header in front of garbage
                    bytes.replaceSubrange(0..<4, with: [0x4F, 0x42, 0x43, 0x31])
                    bytes[4] = UInt8(ControlProtocol.version); bytes[5] = 0
                }
            } else {
                bytes = g.message().encode()
                switch g.below(6) {
                case 0:
                    for _ in 0...g.below(3) { let k = g.below(bytes.count); bytes[k] ^= UInt8(1 << g.below(8)) }
                case 1:
                    bytes.removeLast(min(bytes.count, 1 + g.below(8)))
                case 2:
                    bytes.append(contentsOf: (0...g.below(8)).map { _ in UInt8(truncatingIfNeeded: g.next()) })
                case 3:
                    // A length or count field (any 4-byte word past the header) set to an extreme.
                    if bytes.count >= 20 {
                        let k = 16 + g.below(bytes.count - 19)
                        let v: UInt32 = [0, 1, 0x7FFF_FFFF, 0xFFFF_FFFF, 4096, 65][g.below(6)]
                        withUnsafeBytes(of: v.littleEndian) { for j in 0..<4 { bytes[k + j] = $0[j] } }
                    }
                case 4:
                    bytes[8] = UInt8(truncatingIfNeeded: g.next())  // payload length
                default:
                    let k = g.below(bytes.count)
                    bytes[k] = UInt8(truncatingIfNeeded: g.next())
                }
            }
            do {
                let m = try ControlMessage.decode(bytes, limit: ControlProtocol.maxReportBytes)
                // Accepted: it must be exactly a valid message (canonical encoding).
                #expect(m.encode() == bytes, "accepted non-canonical bytes \(bytes)")
                accepted += 1
            } catch {
                rejected += 1
            }
        }
        #expect(rejected > 100_000)
        #expect(accepted > 1_000)  // mutations that happen to stay valid (e.g. inside a name)
    }

    @Test func limitsAreEnforced() {
        let big = ControlMessage.statusReport(String(repeating: "x", count: 5000)).encode()
        #expect(throws: ControlError.tooLarge(size: big.count, limit: ControlProtocol.maxMessageBytes)) {
            try ControlMessage.decode(big)
        }
        let longName = ControlMessage.openSession(OpenSession(device: String(repeating: "d", count: 65), deviceClass: .block, writable: true,
                                                               dataBytes: 1, queueDepth: 2)).encode()
        #expect(throws: ControlError.self) { try ControlMessage.decode(longName) }
        let control = ControlMessage.sessionFailed(reason: "line\nbreak").encode()
        #expect(throws: ControlError.self) { try ControlMessage.decode(control) }
        var badBool = ControlMessage.attach(Attach(sessionID: 1, tableIndex: 0, queueDepth: 2, writable: true, dataBytes: 1)).encode()
        badBool[16 + 16] = 2
        #expect(throws: ControlError.self) { try ControlMessage.decode(badBool) }
    }
}

/// The tagged parts of version 2 (device class, class info, transport, class parameters,
/// recovery): every tag or body length a peer might choose other than the defined ones is
/// refused as malformed, with a reason that names the part.
@Suite struct TaggedSectionTests {
    static func decodedTransport(_ bytes: [UInt8]) -> TransportParameters? {
        guard case .driverStart(let s)? = try? ControlMessage.decode(bytes) else { return nil }
        return s.transport
    }

    static func refused(_ bytes: [UInt8], _ what: String) -> Bool {
        do {
            _ = try ControlMessage.decode(bytes)
            return false
        } catch .malformed(let reason) {
            return reason.contains(what)
        } catch {
            return false
        }
    }

    @Test func unknownDeviceClassesAreMalformed() {
        let open = ControlMessage.openSession(OpenSession(device: "m0", deviceClass: .block, writable: true, dataBytes: 1, queueDepth: 2)).encode()
        let at = 16 + 4 + 2  // header, name length, "m0"
        #expect(open[at] == DeviceClass.block.rawValue)
        for tag: UInt8 in [0, 3, 0x7F, 0xFF] {
            var b = open; b[at] = tag
            #expect(Self.refused(b, "device class: unknown \(tag)"))
        }
    }

    @Test func classInfoTagsAndLengthsAreChecked() {
        let info = BlockInfo(blockSize: 512, blockCount: 8, maxTransfer: 4096, flags: [.flush])
        let m = ControlMessage.sessionOpened(SessionOpened(sessionID: 1, generation: 2, queueDepth: 4, writable: true, dataBytes: 4096,
                                                           classInfo: .block(info))).encode()
        let at = 16 + 8 + 8 + 4 + 1 + 8
        #expect(m[at] == DeviceClass.block.rawValue && m[at + 1] == 20 && m[at + 2] == 0)
        for tag: UInt8 in [0, 3, 0xFF] {
            var b = m; b[at] = tag
            #expect(Self.refused(b, "class info: unknown tag \(tag)"))
        }
        for length: UInt8 in [0, 19, 21, 0xFF] {
            var b = m; b[at + 1] = length
            #expect(Self.refused(b, "class info 1: body of \(length) bytes"))
        }
        // The same section in deviceInfo, and unknown flag bits inside it.
        let d = ControlMessage.deviceInfo(.block(info)).encode()
        var b = d; b[16] = 9
        #expect(Self.refused(b, "class info: unknown tag 9"))
        b = d; b[16 + 3 + 16] |= 0x80
        #expect(Self.refused(b, "device flags: unknown bits"))
    }

    /// A net section: its length, a MAC of more than 48 bits, an MTU outside 68...9000.
    @Test func netClassInfoIsChecked() throws {
        let info = NetInfo(mac: MACAddress("02:00:00:00:00:01")!, mtu: 1500)
        let m = ControlMessage.deviceInfo(.net(info)).encode()
        #expect(m[16] == DeviceClass.net.rawValue && m[17] == 11 && m[18] == 0)
        #expect(try ControlMessage.decode(m) == .deviceInfo(.net(info)))
        var b = m; b[19 + 6] = 1  // byte 6 of the little-endian UInt64: bit 48
        #expect(Self.refused(b, "MAC address: bits above 48"))
        b = m; b[19 + 8] = 0; b[19 + 9] = 0  // MTU 0
        #expect(Self.refused(b, "MTU 0 outside"))
        b = m; b[19 + 8] = 0x29; b[19 + 9] = 0x23  // 9001
        #expect(Self.refused(b, "MTU 9001 outside"))
        b = m; b[17] = 10
        #expect(Self.refused(b, "class info 2: body of 10 bytes"))
        let p = ControlMessage.driverStart(DriverStart(device: "n", generation: 1, tableCapacity: 4, heartbeatIntervalMs: 10,
                                                       transport: .memory(latencyMicroseconds: 0),
                                                       deviceClass: .net(NetParameters(mac: info.mac, mtu: 9000)))).encode()
        #expect(try ControlMessage.decode(p) == .driverStart(DriverStart(device: "n", generation: 1, tableCapacity: 4, heartbeatIntervalMs: 10,
                                                                        transport: .memory(latencyMicroseconds: 0),
                                                                        deviceClass: .net(NetParameters(mac: info.mac, mtu: 9000)))))
    }

    @Test func transportAndClassParametersAreChecked() {
        func start(_ t: TransportParameters) -> [UInt8] {
            ControlMessage.driverStart(DriverStart(device: "d", generation: 1, tableCapacity: 4, heartbeatIntervalMs: 10, transport: t,
                                                   deviceClass: .block(BlockParameters(blockSize: 512, blockCount: 8, maxTransfer: 4096)))).encode()
        }
        let at = 16 + 4 + 1 + 8 + 4 + 4  // header, "d", generation, table capacity, heartbeat
        let memory = start(.memory(latencyMicroseconds: 5))
        let vhost = start(.vhostUser(VirtioParameters(queueSize: 256, notifyMode: .adaptive, pollMicroseconds: 50,
                                                      dmaIOAddress: IOAddress(rawValue: 1 << 20))))
        let vfio = start(.vfio(VirtioParameters(queueSize: 128, notifyMode: .eventIndex, pollMicroseconds: 0,
                                                dmaIOAddress: IOAddress(rawValue: 1 << 20))))
        #expect(memory[at] == 1 && memory[at + 1] == 4 && vhost[at] == 2 && vhost[at + 1] == 17)
        #expect(vfio[at] == 3 && vfio[at + 1] == 17 && vfio[(at + 3)...] != vhost[(at + 3)...])
        for tag: UInt8 in [0, 4, 0xFF] {
            var b = memory; b[at] = tag
            #expect(Self.refused(b, "transport: unknown tag \(tag)"))
        }
        // A memory body under the vhost-user tag (and the reverse): the lengths differ.
        var b = memory; b[at] = 2
        #expect(Self.refused(b, "transport 2: body of 4 bytes, expected 17"))
        b = vhost; b[at] = 1
        #expect(Self.refused(b, "transport 1: body of 17 bytes, expected 4"))
        b = memory; b[at] = 3
        #expect(Self.refused(b, "transport 3: body of 4 bytes, expected 17"))
        // The vfio tag carries the same virtio body and decodes to vfio, not vhost-user.
        b = vhost; b[at] = 3
        #expect(Self.decodedTransport(b) == .vfio(VirtioParameters(queueSize: 256, notifyMode: .adaptive, pollMicroseconds: 50,
                                                                     dmaIOAddress: IOAddress(rawValue: 1 << 20))))
        // The notify mode inside the vhost-user body.
        b = vhost; b[at + 3 + 4] = 9
        #expect(Self.refused(b, "notify mode: unknown 9"))
        // The class parameters follow the transport.
        let cls = at + 3 + 4
        #expect(memory[cls] == DeviceClass.block.rawValue && memory[cls + 1] == 16)
        b = memory; b[cls] = 3
        #expect(Self.refused(b, "class parameters: unknown tag 3"))
        // A block body under the net tag: the lengths differ.
        b = memory; b[cls] = 2
        #expect(Self.refused(b, "class parameters 2: body of 16 bytes"))
        b = memory; b[cls + 1] = 15
        #expect(Self.refused(b, "class parameters 1: body of 15 bytes"))
    }

    @Test func deviceLostCarriesAKnownRecovery() {
        let m = ControlMessage.deviceLost(reason: "gone", recovery: .reconnectDevice).encode()
        #expect(m[16] == Recovery.reconnectDevice.rawValue)
        for raw: UInt8 in [0, 6, 0xFF] {
            var b = m; b[16] = raw
            #expect(Self.refused(b, "recovery: unknown \(raw)"))
        }
    }

    /// Peers of an earlier version (version 3: no net class) are refused by version, not misread.
    @Test func theVersionChanged() {
        var b = ControlMessage.statusRequest.encode()
        #expect(ControlProtocol.version == 4)
        b[4] = 3
        #expect(throws: ControlError.unsupportedVersion(3)) { try ControlMessage.decode(b) }
    }

    /// Descriptor counts are fixed per type, whatever the class or transport.
    @Test func descriptorCountsArePerType() {
        #expect(MessageType.sessionOpened.descriptorCount == 5 && MessageType.driverStart.descriptorCount == 3)
        #expect(MessageType.attach.descriptorCount == 4 && MessageType.queuesReplaced.descriptorCount == 1)
        #expect(MessageType.deviceConnection.descriptorCount == 1)
        for t in MessageType.allCases where ![.sessionOpened, .driverStart, .attach, .queuesReplaced, .deviceConnection].contains(t) {
            #expect(t.descriptorCount == 0, "\(t)")
        }
    }
}

/// The classifications the supervisor and the client library act on.
@Suite struct RecoveryTests {
    @Test func driverExitStatusCarriesARecovery() {
        for r in Recovery.allCases {
            #expect(DriverExit.recovery(.exited(DriverExit.status(for: r))) == r)
        }
        // Anything else asks for a new driver: a crash, a kill, a clean or unclassified exit.
        for s: OutboardSystem.ExitStatus in [.signalled(9), .signalled(11), .exited(0), .exited(1), .exited(3), .exited(DriverExit.base),
                              .exited(DriverExit.base + 6), .exited(-1)] {
            #expect(DriverExit.recovery(s) == .restartDriver, "\(s)")
        }
    }

    @Test func refusalsMapToARecovery() {
        #expect(ErrorCode.busy.recovery == .retry && ErrorCode.internalError.recovery == .retry)
        #expect(ErrorCode.deviceFailed.recovery == .failDevice)
        for c in [ErrorCode.malformed, .unknownDevice, .permissionDenied, .limitExceeded, .invalidArgument] {
            #expect(c.recovery == .fatal, "\(c)")
        }
        #expect(ChannelError.socket(.closed).recovery == .reconnectDevice)
        #expect(ChannelError.socket(.system(.wouldBlock)).recovery == .retry)
        #expect(ChannelError.control(.malformed("x")).recovery == .fatal)
        #expect(SessionSetupError.system(.noMemory).recovery == .retry && SessionSetupError.invalid("x").recovery == .fatal)
    }
}

@Suite struct SharedLayoutTests {
    /// The pages the manager, driver and client share, byte by byte as their documentation
    /// gives them: written through the API, read back raw at the documented offsets.
    @Test func sharedPagesAtTheirDocumentedOffsets() {
        let mem = UnsafeMutableRawPointer.allocate(byteCount: 8192, alignment: 4096)
        defer { mem.deallocate() }
        func u32(_ at: Int) -> UInt32 { mem.load(fromByteOffset: at, as: UInt32.self) }
        func u64(_ at: Int) -> UInt64 { mem.load(fromByteOffset: at, as: UInt64.self) }

        mem.initializeMemory(as: UInt8.self, repeating: 0, count: 8192)
        #expect(SessionHeaderPage.byteCount == 4096)
        SessionHeaderPage(mem).publish(generation: 0x1122_3344_5566_7788, state: .recovering)
        #expect(u64(0) == 0x1122_3344_5566_7788 && u32(8) == SessionState.recovering.rawValue)
        #expect(SessionState.serving.rawValue == 0 && SessionState.failed.rawValue == 2 && SessionState.closed.rawValue == 3)

        mem.initializeMemory(as: UInt8.self, repeating: 0, count: 8192)
        let d = DriverPage(mem, tableCapacity: 4)
        #expect(DriverPage.inUseOffset == 64 && DriverPage.byteCount(tableCapacity: 4) == 64 + 16)
        d.beat(); d.beat()
        d.addCompleted(3)
        d.add(.kicks, 4); d.add(.interrupts, 5); d.add(.signals, 6); d.add(.submitted, 7)
        d.markInUse(2)
        #expect(u64(0) == 2 && u64(8) == 3 && u64(16) == 4 && u64(24) == 5 && u64(32) == 6 && u64(40) == 7)
        #expect(u32(64) == 0 && u32(64 + 4 * 2) == 1 && u32(64 + 4 * 3) == 0)
        d.clearInUse(2)
        #expect(u32(64 + 4 * 2) == 0)

        mem.initializeMemory(as: UInt8.self, repeating: 0xAA, count: 8192)
        let t = TranslationTable(mem, capacity: 4)
        #expect(TranslationTable.headerSize == 64 && TranslationTable.entrySize == 64)
        #expect(TranslationTable.byteCount(capacity: 4) == 64 + 4 * 64)
        t.format(generation: 9)
        #expect(u32(0) == 0x5454_424F && u32(4) == 4 && u64(8) == 9 && u64(16) == 0)
        t.requestAbort(generation: 10)
        #expect(u64(16) == 10)
        t.write(1, .init(state: .revoking, sessionID: 0xA1, ioAddress: IOAddress(rawValue: 0xB2), length: 0xC3, leaseEnd: 0xD4, writable: true))
        let e = 64 + 64
        #expect(u32(e) != 0 && u32(e) % 2 == 0, "seqlock even (and moved) after a write")
        #expect(u32(e + 4) == TranslationTable.EntryState.revoking.rawValue && u64(e + 8) == 0xA1 && u64(e + 16) == 0xB2)
        #expect(u64(e + 24) == 0xC3 && u64(e + 32) == 0xD4 && u32(e + 40) == 1)
        #expect(u32(64) == 0 && u32(64 + 4) == 0, "entry 0 left free")
        #expect(TranslationTable.EntryState.free.rawValue == 0 && TranslationTable.EntryState.active.rawValue == 1)
    }

    @Test func blockEntryLayouts() {
        #expect(MemoryLayout<BlockRequest>.size == 32 && MemoryLayout<BlockRequest>.stride == 32)
        #expect(MemoryLayout<BlockRequest>.offset(of: \.sector) == 8)
        #expect(MemoryLayout<BlockRequest>.offset(of: \.offset) == 16)
        #expect(MemoryLayout<BlockRequest>.offset(of: \.length) == 24)
        #expect(MemoryLayout<BlockCompletion>.size == 16)
        #expect(MemoryLayout<BlockCompletion>.offset(of: \.generation) == 8)
    }

    /// The driver's translation check: only the session's own active entry, only inside it,
    /// only while the lease runs, only in the allowed direction.
    @Test func translationTable() {
        let capacity = 4
        let mem = UnsafeMutableRawPointer.allocate(byteCount: TranslationTable.byteCount(capacity: capacity), alignment: 64)
        defer { mem.deallocate() }
        let t = TranslationTable(mem, capacity: capacity)
        t.format(generation: 3)
        #expect(t.generation == 3)
        let e = TranslationTable.Entry(state: .active, sessionID: 9, ioAddress: IOAddress(rawValue: 1 << 32), length: 8192, leaseEnd: 1000, writable: true)
        t.write(2, e)
        let r = t.read(2)
        #expect(r == e)
        #expect(t.read(4) == nil && t.read(-1) == nil)
        #expect(r?.translate(sessionID: 9, offset: RegionOffset(4096), length: 4096, write: true, now: 999) == IOAddress(rawValue: (1 << 32) + 4096))
        #expect(r?.translate(sessionID: 9, offset: RegionOffset(4096), length: 4097, write: true, now: 999) == nil)  // past the end
        #expect(r?.translate(sessionID: 9, offset: RegionOffset(rawValue: .max), length: 2, write: false, now: 999) == nil)  // overflow
        #expect(r?.translate(sessionID: 8, offset: RegionOffset(0), length: 1, write: false, now: 999) == nil)  // another session's
        #expect(r?.translate(sessionID: 9, offset: RegionOffset(0), length: 1, write: false, now: 1000) == nil)  // lease over
        var ro = e; ro.writable = false; t.write(1, ro)
        #expect(t.read(1)?.translate(sessionID: 9, offset: RegionOffset(0), length: 1, write: true, now: 0) == nil)
        var revoking = e; revoking.state = .revoking; t.write(0, revoking)
        #expect(t.read(0)?.translate(sessionID: 9, offset: RegionOffset(0), length: 1, write: false, now: 0) == nil)
        // A corrupt state word reads as no entry.
        (mem + TranslationTable.headerSize + 3 * TranslationTable.entrySize + 4).storeBytes(of: UInt32(77), as: UInt32.self)
        #expect(t.read(3) == nil)
    }

    @Test func inUseMarks() {
        let size = DriverPage.byteCount(tableCapacity: 8)
        let mem = UnsafeMutableRawPointer.allocate(byteCount: size + 64, alignment: 64)
        defer { mem.deallocate() }
        mem.initializeMemory(as: UInt8.self, repeating: 0, count: size + 64)
        let p = DriverPage(mem, tableCapacity: 8)
        p.markInUse(5)
        #expect(p.isInUse(5) && !p.isInUse(4))
        p.clearInUse(5)
        #expect(!p.isInUse(5))
        p.markInUse(8)  // out of range: ignored, nothing written past the page
        #expect((0..<64).allSatisfy { mem.load(fromByteOffset: size + $0, as: UInt8.self) == 0 })
        #expect((0..<8).allSatisfy { !p.isInUse($0) })
        p.beat(); p.beat()
        #expect(p.heartbeat == 2)
    }
}

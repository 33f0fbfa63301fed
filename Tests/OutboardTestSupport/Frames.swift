import OutboardSystem

// Ethernet, ARP, IPv4 and ICMP, parsed and built for tests that talk to the kernel's
// network stack frame by frame (RFC 826, RFC 791, RFC 792). Parsing checks every length
// and checksum: what the peer sent is validated before it is used. Tests only: Outboard's
// data path moves frames and never looks inside them.

/// An IPv4 address, in host order.
public struct IPv4Address: Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public init(_ a: UInt8, _ b: UInt8, _ c: UInt8, _ d: UInt8) {
        rawValue = UInt32(a) << 24 | UInt32(b) << 16 | UInt32(c) << 8 | UInt32(d)
    }
    public var description: String {
        "\(rawValue >> 24).\(rawValue >> 16 & 255).\(rawValue >> 8 & 255).\(rawValue & 255)"
    }
}

extension MACAddress {
    /// From its six octets, in wire order.
    public init(_ a: UInt8, _ b: UInt8, _ c: UInt8, _ d: UInt8, _ e: UInt8, _ f: UInt8) {
        self = MACAddress(bytes: [a, b, c, d, e, f])!
    }
}

public enum EtherType {
    public static let ipv4: UInt16 = 0x0800
    public static let arp: UInt16 = 0x0806
    public static let ipv6: UInt16 = 0x86dd
}

/// Big-endian reads and writes over a byte array.
extension Array where Element == UInt8 {
    public func be16(_ at: Int) -> UInt16 { UInt16(self[at]) << 8 | UInt16(self[at + 1]) }
    public func be32(_ at: Int) -> UInt32 { UInt32(be16(at)) << 16 | UInt32(be16(at + 2)) }
    public func mac(_ at: Int) -> MACAddress { MACAddress(self[at], self[at + 1], self[at + 2], self[at + 3], self[at + 4], self[at + 5]) }
    public mutating func appendBE16(_ v: UInt16) { append(UInt8(v >> 8)); append(UInt8(v & 255)) }
    public mutating func appendBE32(_ v: UInt32) { appendBE16(UInt16(v >> 16)); appendBE16(UInt16(v & 0xffff)) }
    public mutating func append(_ m: MACAddress) { append(contentsOf: m.bytes) }
    public mutating func setBE16(_ at: Int, _ v: UInt16) { self[at] = UInt8(v >> 8); self[at + 1] = UInt8(v & 255) }
}

/// The Internet checksum (RFC 1071) of `bytes`: 0 over data that includes a correct one.
public func internetChecksum(_ bytes: ArraySlice<UInt8>) -> UInt16 {
    var sum: UInt32 = 0
    var i = bytes.startIndex
    while i + 1 < bytes.endIndex {
        sum += UInt32(bytes[i]) << 8 | UInt32(bytes[i + 1])
        i += 2
    }
    if i < bytes.endIndex { sum += UInt32(bytes[i]) << 8 }
    while sum > 0xffff { sum = (sum & 0xffff) + (sum >> 16) }
    return ~UInt16(sum)
}

/// An Ethernet II frame: header and payload (no FCS: a TAP carries none).
public struct EthernetFrame: Sendable {
    public static let headerBytes = 14
    public var destination: MACAddress
    public var source: MACAddress
    public var etherType: UInt16
    public var payload: [UInt8]

    public init(destination: MACAddress, source: MACAddress, etherType: UInt16, payload: [UInt8]) {
        self.destination = destination; self.source = source; self.etherType = etherType; self.payload = payload
    }

    /// nil when shorter than a header, or VLAN-tagged (these tests send no tags).
    public init?(parsing b: [UInt8]) {
        guard b.count >= Self.headerBytes else { return nil }
        destination = b.mac(0); source = b.mac(6); etherType = b.be16(12)
        guard etherType != 0x8100, etherType >= 0x0600 else { return nil }
        payload = Array(b[Self.headerBytes...])
    }

    public var bytes: [UInt8] {
        var b: [UInt8] = []
        b.reserveCapacity(Self.headerBytes + payload.count)
        b.append(destination); b.append(source); b.appendBE16(etherType)
        b += payload
        return b
    }
}

/// An ARP packet for IPv4 over Ethernet (RFC 826).
public struct ARPPacket: Sendable, Equatable {
    public static let request: UInt16 = 1
    public static let reply: UInt16 = 2
    public static let bytes = 28
    public var operation: UInt16
    public var senderMAC: MACAddress
    public var senderIP: IPv4Address
    public var targetMAC: MACAddress
    public var targetIP: IPv4Address

    public init(operation: UInt16, senderMAC: MACAddress, senderIP: IPv4Address, targetMAC: MACAddress, targetIP: IPv4Address) {
        self.operation = operation; self.senderMAC = senderMAC; self.senderIP = senderIP
        self.targetMAC = targetMAC; self.targetIP = targetIP
    }

    /// nil unless Ethernet/IPv4 ARP (hardware type 1, protocol 0x0800, lengths 6 and 4).
    /// Trailing bytes (Ethernet padding) are ignored.
    public init?(parsing b: [UInt8]) {
        guard b.count >= Self.bytes, b.be16(0) == 1, b.be16(2) == EtherType.ipv4, b[4] == 6, b[5] == 4 else { return nil }
        operation = b.be16(6)
        senderMAC = b.mac(8); senderIP = IPv4Address(rawValue: b.be32(14))
        targetMAC = b.mac(18); targetIP = IPv4Address(rawValue: b.be32(24))
    }

    public var bytes: [UInt8] {
        var b: [UInt8] = []
        b.appendBE16(1); b.appendBE16(EtherType.ipv4); b.append(6); b.append(4); b.appendBE16(operation)
        b.append(senderMAC); b.appendBE32(senderIP.rawValue); b.append(targetMAC); b.appendBE32(targetIP.rawValue)
        return b
    }
}

/// An IPv4 packet without options' meaning (they are kept as part of the header length).
public struct IPv4Packet: Sendable {
    public static let icmp: UInt8 = 1
    public var source: IPv4Address
    public var destination: IPv4Address
    public var `protocol`: UInt8
    public var ttl: UInt8
    public var identification: UInt16
    public var payload: [UInt8]

    public init(source: IPv4Address, destination: IPv4Address, protocol: UInt8, ttl: UInt8 = 64,
                identification: UInt16 = 0, payload: [UInt8]) {
        self.source = source; self.destination = destination; self.protocol = `protocol`
        self.ttl = ttl; self.identification = identification; self.payload = payload
    }

    /// Why a packet was refused.
    public enum Refusal: Error, Equatable { case short, version, headerLength, totalLength, checksum, fragment }

    /// Checks version, header length, total length against what arrived (Ethernet padding
    /// after it is dropped), the header checksum, and that it is not a fragment.
    public static func parse(_ b: [UInt8]) -> Result<IPv4Packet, Refusal> {
        guard b.count >= 20 else { return .failure(.short) }
        guard b[0] >> 4 == 4 else { return .failure(.version) }
        let ihl = Int(b[0] & 15) * 4
        guard ihl >= 20, ihl <= b.count else { return .failure(.headerLength) }
        let total = Int(b.be16(2))
        guard total >= ihl, total <= b.count else { return .failure(.totalLength) }
        guard internetChecksum(b[0..<ihl]) == 0 else { return .failure(.checksum) }
        let fragment = b.be16(6)
        guard fragment & 0x3fff == 0 else { return .failure(.fragment) }  // MF set or an offset
        return .success(IPv4Packet(source: IPv4Address(rawValue: b.be32(12)), destination: IPv4Address(rawValue: b.be32(16)),
                                   protocol: b[9], ttl: b[8], identification: b.be16(4), payload: Array(b[ihl..<total])))
    }

    /// A 20-byte header (DF set) with its checksum, then the payload.
    public var bytes: [UInt8] {
        var b: [UInt8] = [0x45, 0]
        b.appendBE16(UInt16(20 + payload.count))
        b.appendBE16(identification); b.appendBE16(0x4000)
        b.append(ttl); b.append(`protocol`); b.appendBE16(0)
        b.appendBE32(source.rawValue); b.appendBE32(destination.rawValue)
        b.setBE16(10, internetChecksum(b[0..<20]))
        return b + payload
    }
}

/// An ICMP echo request or reply (RFC 792).
public struct ICMPEcho: Sendable, Equatable {
    public static let reply: UInt8 = 0
    public static let request: UInt8 = 8
    public var type: UInt8
    public var identifier: UInt16
    public var sequence: UInt16
    public var data: [UInt8]

    public init(type: UInt8, identifier: UInt16, sequence: UInt16, data: [UInt8]) {
        self.type = type; self.identifier = identifier; self.sequence = sequence; self.data = data
    }

    /// nil unless an echo request or reply, code 0, with a correct checksum.
    public init?(parsing b: [UInt8]) {
        guard b.count >= 8, b[0] == Self.request || b[0] == Self.reply, b[1] == 0,
              internetChecksum(b[...]) == 0 else { return nil }
        type = b[0]; identifier = b.be16(4); sequence = b.be16(6); data = Array(b[8...])
    }

    public var bytes: [UInt8] {
        var b: [UInt8] = [type, 0, 0, 0]
        b.appendBE16(identifier); b.appendBE16(sequence)
        b += data
        b.setBE16(2, internetChecksum(b[...]))
        return b
    }
}

import ArgumentParser

/// An option that takes several values: one argument, comma separated (`--qd 1,8,32`,
/// `--batches 1,8`, `--rate 20000,40000`), the one spelling every `outboard` subcommand
/// uses for a list. An empty entry or one that does not parse is refused.
struct ListOption<Element: LosslessStringConvertible & Sendable>: ExpressibleByArgument, ExpressibleByArrayLiteral, Sendable {
    var values: [Element]

    init(_ values: [Element]) { self.values = values }
    init(arrayLiteral elements: Element...) { values = elements }

    init?(argument: String) {
        guard let v = parseList(argument, as: Element.self) else { return nil }
        values = v
    }

    var defaultValueDescription: String { values.map { "\($0)" }.joined(separator: ",") }
}

/// `text` split at commas, each entry (spaces around it ignored) parsed as `T`; nil if
/// any entry is empty or does not parse, or there is none.
func parseList<T: LosslessStringConvertible>(_ text: String, as _: T.Type = T.self) -> [T]? {
    var out: [T] = []
    for part in text.split(separator: ",", omittingEmptySubsequences: false) {
        var entry = part
        while entry.first == " " { entry.removeFirst() }
        while entry.last == " " { entry.removeLast() }
        guard let v = T(String(entry)) else { return nil }
        out.append(v)
    }
    return out.isEmpty ? nil : out
}

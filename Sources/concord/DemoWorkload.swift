import ConcordCore

/// Customers and orders: inserts, updates, deletes and multi-record transactions.
struct Workload {
    var generator: SeededGenerator
    var customers = 0
    var orders: [Int] = []
    var nextOrder = 1

    init(seed: UInt64) { generator = SeededGenerator(seed: seed) }

    /// The records a service already holds: half customers, half their orders, in batches.
    mutating func initialData(records: Int) -> [[WriteOperation]] {
        var batches: [[WriteOperation]] = []
        var batch: [WriteOperation] = []
        let count = records / 2
        for _ in 0..<count {
            customers += 1
            batch.append(.upsert("customers", "c\(customers)", json: customer(customers, tier: "basic")))
        }
        for _ in 0..<(records - count) {
            let order = nextOrder
            nextOrder += 1
            orders.append(order)
            let owner = Int.random(in: 1...max(1, customers), using: &generator)
            let amount = Int.random(in: 100...99_999, using: &generator)
            batch.append(
                .upsert(
                    "orders", "o\(order)",
                    json: "{\"customer\":\"c\(owner)\",\"amount_cents\":\(amount),\"status\":\"placed\"}"))
        }
        while !batch.isEmpty {
            batches.append(Array(batch.prefix(5_000)))
            batch.removeFirst(min(5_000, batch.count))
        }
        return batches
    }

    mutating func nextTransaction() -> [WriteOperation] {
        let roll = Int.random(in: 0..<100, using: &generator)
        if customers < 20 || roll < 20 {
            customers += 1
            return [.upsert("customers", "c\(customers)", json: customer(customers, tier: "basic"))]
        }
        let customer = Int.random(in: 1...customers, using: &generator)
        if roll < 60 {
            // An order and the customer's updated profile, atomically.
            let order = nextOrder
            nextOrder += 1
            orders.append(order)
            let amount = Int.random(in: 100...99_999, using: &generator)
            return [
                .upsert(
                    "orders", "o\(order)",
                    json: "{\"customer\":\"c\(customer)\",\"amount_cents\":\(amount),\"status\":\"placed\"}"),
                .upsert("customers", "c\(customer)", json: self.customer(customer, tier: "active")),
            ]
        }
        if roll < 85, !orders.isEmpty {
            let order = orders[Int.random(in: 0..<orders.count, using: &generator)]
            return [.upsert("orders", "o\(order)", json: "{\"customer\":\"c\(customer)\",\"status\":\"shipped\"}")]
        }
        if !orders.isEmpty {
            let index = Int.random(in: 0..<orders.count, using: &generator)
            let order = orders.remove(at: index)
            return [.delete("orders", "o\(order)")]
        }
        return [.upsert("customers", "c\(customer)", json: self.customer(customer, tier: "gold"))]
    }

    func customer(_ id: Int, tier: String) -> String {
        "{\"name\":\"Customer \(id)\",\"email\":\"c\(id)@example.com\",\"tier\":\"\(tier)\"}"
    }
}

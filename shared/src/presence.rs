//! The presence key format: which gateways hold a user's connections, as the gateways write
//! it and logic reads it (the Redis implementation is `im_bus::presence::RedisPresence`).
//!
//! One hash per user, `im:presence:<user>`, with a field per connection,
//! `<gateway-id>#<conn>`, whose value is `<token id> <device id>` (the device empty when the
//! token named none): logout finds the connections its token opened through it. The key's
//! TTL (three presence refresh periods) is refreshed while the user has a connection, so the
//! entries of a gateway that died without saying goodbye age out. A stale field costs one
//! wasted downstream record, never a wrong delivery (gateways deliver by user).

/// The Redis key of a user's presence hash.
pub fn key(user: u64) -> String {
    format!("im:presence:{user}")
}

/// The hash field of one connection.
pub fn field(gateway_id: &str, conn: u64) -> String {
    format!("{gateway_id}#{conn}")
}

/// The gateway of a field (`None` for one this build did not write).
pub fn gateway_of(field: &str) -> Option<&str> {
    field.rsplit_once('#').map(|(gw, _)| gw)
}

/// The value of a connection's field.
pub fn value(jti: &str, device: Option<&str>) -> String {
    format!("{jti} {}", device.unwrap_or(""))
}

/// The token id in a field's value.
pub fn jti_of(value: &str) -> &str {
    value.split(' ').next().unwrap_or("")
}

/// The device id in a field's value ("" for none).
pub fn device_of(value: &str) -> &str {
    value.split_once(' ').map_or("", |(_, d)| d)
}

/// The connection (the records' `conn`) of a field.
pub fn conn_of(field: &str) -> Option<u64> {
    field.rsplit_once('#').and_then(|(_, c)| c.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_name_their_gateway() {
        let f = field("host-8090#x", 42);
        assert_eq!(f, "host-8090#x#42");
        assert_eq!(gateway_of(&f), Some("host-8090#x"));
        assert_eq!(gateway_of("nohash"), None);
        assert_eq!(conn_of(&f), Some(42));
        assert_eq!(jti_of(&value("abc", Some("phone"))), "abc");
        assert_eq!(jti_of(&value("abc", None)), "abc");
        assert_eq!(device_of(&value("abc", Some("phone"))), "phone");
        assert_eq!(device_of(&value("abc", None)), "");
        assert_eq!(key(7), "im:presence:7");
    }
}

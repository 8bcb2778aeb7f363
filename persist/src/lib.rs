//! Kafka → MySQL batch writer (to be written).

//! Generated `ferrotwin.v1` gRPC/protobuf code and the on-disk record messages. No logic.

pub mod v1 {
    tonic::include_proto!("ferrotwin.v1");
}

pub mod store {
    pub mod v1 {
        tonic::include_proto!("ferrotwin.store.v1");
    }
}

/// Encoded `FileDescriptorSet` of every ferrotwin proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ferrotwin_descriptor.bin"));

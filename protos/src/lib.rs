//! Generated `ferrotwin.v1` gRPC/protobuf code, the on-disk record messages and the Sparkplug B
//! payload of MQTT. No logic.

pub mod codec;

pub mod v1 {
    tonic::include_proto!("ferrotwin.v1");
}

pub mod store {
    pub mod v1 {
        tonic::include_proto!("ferrotwin.store.v1");
    }
}

/// The Sparkplug B payload (`org.eclipse.tahu.protobuf`, field numbers of Eclipse Tahu's
/// `sparkplug_b.proto`), spoken by the simulator's MQTT publisher and the MQTT adapter.
pub mod sparkplug {
    tonic::include_proto!("org.eclipse.tahu.protobuf");
}

/// Encoded `FileDescriptorSet` of every ferrotwin proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ferrotwin_descriptor.bin"));

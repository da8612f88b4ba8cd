//! The generated hands.v1 protocol types, client and server (from
//! `proto/hands/v1/sandbox.proto`, see `build.rs`), and the conversions between
//! them and the crate's own tool types.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// Generated code of package `hands.v1`.
pub mod v1 {
    tonic::include_proto!("hands.v1");
}

/// The encoded descriptor set of hands.v1, for gRPC reflection.
pub const DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/hands_v1_descriptor.bin"));

use crate::tools::{Base64Source, ContentBlock, ToolResult};

impl From<&ContentBlock> for v1::ContentBlock {
    fn from(b: &ContentBlock) -> Self {
        use v1::content_block::Block;
        let src = |s: &Base64Source| v1::Base64Source {
            media_type: s.media_type.clone(),
            data: s.data.clone(),
        };
        v1::ContentBlock {
            block: Some(match b {
                ContentBlock::Text { text } => Block::Text(text.clone()),
                ContentBlock::Image { source } => Block::Image(src(source)),
                ContentBlock::Document { source } => Block::Document(src(source)),
            }),
        }
    }
}

impl TryFrom<&v1::ContentBlock> for ContentBlock {
    type Error = &'static str;

    fn try_from(b: &v1::ContentBlock) -> Result<Self, Self::Error> {
        use v1::content_block::Block;
        let src = |s: &v1::Base64Source| Base64Source {
            kind: "base64".into(),
            media_type: s.media_type.clone(),
            data: s.data.clone(),
        };
        Ok(match b.block.as_ref().ok_or("empty content block")? {
            Block::Text(text) => ContentBlock::Text { text: text.clone() },
            Block::Image(s) => ContentBlock::Image { source: src(s) },
            Block::Document(s) => ContentBlock::Document { source: src(s) },
        })
    }
}

/// The `Finished` event of a result.
pub fn finished(result: &ToolResult, outcome: v1::Outcome) -> v1::Finished {
    v1::Finished {
        content: result.content.iter().map(Into::into).collect(),
        is_error: result.is_error,
        outcome: outcome as i32,
    }
}

/// The result carried by a `Finished` event.
pub fn result_of(f: &v1::Finished) -> Result<ToolResult, &'static str> {
    Ok(ToolResult {
        content: f
            .content
            .iter()
            .map(ContentBlock::try_from)
            .collect::<Result<_, _>>()?,
        is_error: f.is_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// The service surface other implementations are tested against: renaming a
    /// method or the package is a protocol break and must fail here.
    #[test]
    fn descriptor_has_the_sandbox_service_and_its_methods() {
        let fds = prost_types::FileDescriptorSet::decode(DESCRIPTOR_SET).unwrap();
        let file = fds
            .file
            .iter()
            .find(|f| f.package() == "hands.v1")
            .expect("hands.v1 package");
        let svc = file
            .service
            .iter()
            .find(|s| s.name() == "Sandbox")
            .expect("Sandbox service");
        let methods: Vec<(&str, bool)> = svc
            .method
            .iter()
            .map(|m| (m.name(), m.server_streaming()))
            .collect();
        assert_eq!(
            methods,
            [
                ("Info", false),
                ("OpenSession", false),
                ("CloseSession", false),
                ("ListSessions", false),
                ("Call", true),
                ("Attach", true),
                ("Cancel", false),
            ]
        );
    }

    #[test]
    fn results_round_trip_through_the_protocol() {
        let r = ToolResult {
            content: vec![
                ContentBlock::Text { text: "hi".into() },
                ContentBlock::Image {
                    source: Base64Source {
                        kind: "base64".into(),
                        media_type: "image/png".into(),
                        data: "iVBORw0KGgo=".into(),
                    },
                },
            ],
            is_error: true,
        };
        let f = finished(&r, v1::Outcome::Completed);
        let wire = v1::CallEvent {
            event: Some(v1::call_event::Event::Finished(f)),
        }
        .encode_to_vec();
        let back = v1::CallEvent::decode(wire.as_slice()).unwrap();
        let Some(v1::call_event::Event::Finished(f)) = back.event else {
            panic!("not a Finished event")
        };
        assert_eq!(f.outcome(), v1::Outcome::Completed);
        assert_eq!(result_of(&f).unwrap(), r);
    }
}

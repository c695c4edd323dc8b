//! Prints the LlmEndpoint CustomResourceDefinition as YAML; `crds/` holds its output.

use kube::CustomResourceExt;
use llmesh_operator::crd::LlmEndpoint;

fn main() -> anyhow::Result<()> {
    print!("{}", serde_yaml_ng::to_string(&LlmEndpoint::crd())?);
    Ok(())
}

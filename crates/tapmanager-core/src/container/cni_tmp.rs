//! TEMPORARY stand-ins for the Go-compatible types of `crate::types` (being written on another branch).
#![allow(missing_docs)]

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(default)]
    pub interfaces: Vec<CniInterface>,
    #[serde(default)]
    pub ips: Vec<CniIpConfig>,
    #[serde(default)]
    pub routes: Vec<CniRoute>,
    #[serde(default)]
    pub dns: serde_json::Value,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CniInterface {
    pub name: String,
    #[serde(default)]
    pub mac: String,
    #[serde(default)]
    pub sandbox: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CniIpConfig {
    #[serde(default)]
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    #[serde(with = "disp")]
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CniRoute {
    #[serde(with = "disp")]
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InterfaceDescription {
    #[serde(rename = "Type")]
    pub kind: u8,
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "HardwareAddr")]
    pub hardware_addr: Option<[u8; 6]>,
    #[serde(rename = "PCIAddress")]
    pub pci_address: String,
    #[serde(rename = "MTU")]
    pub mtu: u16,
    #[serde(rename = "VlanID")]
    pub vlan_id: i32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerSideNetwork {
    #[serde(rename = "Result")]
    pub result: CniResult,
    #[serde(rename = "NsPath")]
    pub ns_path: String,
    #[serde(rename = "Interfaces")]
    pub interfaces: Vec<InterfaceDescription>,
}

mod disp {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &ipnet::IpNet, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ipnet::IpNet, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

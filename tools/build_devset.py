"""Build the small real dev set: public sample images from public GitHub repositories → challenge npz.

Every raw file is pinned by (repo, commit, path, sha256) in FILES below and read straight out of a
fetched snapshot (a bare git dir, default /work/.mirror/<owner>+<name>/repo) with
`git --git-dir … show <commit>:<path>`; a hash mismatch stops the build. Nothing is downloaded here.

Output (challenge layout):
  devset/imgs/<name>.npz       imgs (2D H×W×3 / 3D D×H×W uint8), boxes (N×4 / N×6), spacing (3D)
  devset/gts/<name>.npz        gts (uint8 label map, label i+1 ↔ box i), boxes, spacing (3D)
  devset/unlabeled/<name>.npz  imgs (+ spacing) for sources without masks (distillation/calibration)
  devset/manifest.csv          one row per case: source, commit, path, sha256, licence, labeled
  demo/imgs, demo/gts          copies of DEMO_CASES, bundled for the README's demo command

Conventions (the challenge's): boxes are inclusive pixel bounds of each object's mask, 2D (x0, y0,
x1, y1), 3D (x0, y0, z0, x1, y1, z1); 3D `spacing` is the voxel size in mm in (x, y, z) order, as
SimpleITK's GetSpacing() writes it in the challenge's own preprocessing; CT is windowed to soft
tissue [-160, 240] HU, MR/PET are min-max scaled between the 0.5 and 99.5 percentiles.

Objects: each source label value is split into connected components; a component is kept as its
own object (own label, own box) if it has ≥ MIN_OBJECT_PIXELS and ≥ MIN_OBJECT_FRACTION of the largest
component of that source label, smaller specks are dropped from gts (set to 0), so every label has a box.

Run:  python -m tools.build_devset            (all cases, then the demo copies)
      python -m tools.build_devset --only 3DBox_CT_totalseg_1 --mirror-root /path/to/mirrors
"""
from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import zlib
from dataclasses import dataclass, field

if __package__ in (None, ""):  # run as `python tools/build_devset.py`: make the project importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2
import numpy as np
from scipy import ndimage

import data

# ---------------------------------------------------------------- pinned raw files ----------------
# Sources: (repo, commit) pairs, then one row per raw file: key → (source, path, sha256).
SRC_PYRADIOMICS = ("AIM-Harvard/pyradiomics", "8ed579383b44806651c463d5e691f3b2b57522ab")
SRC_TOTALSEGMENTATOR = ("wasserth/TotalSegmentator", "0e65a448d557382b1e925276212b3bec7f5aff83")
SRC_RETINA_UNET = ("orobix/retina-unet", "1ccd6f86a49e00a3ff8d9925bb3c78d818ed0e87")
SRC_OPENIST = ("pi-null-mezon/OpenIST", "0a3fceb1ac58e1848f994ee6ec226c58e55d70b0")
SRC_UCTRANSNET = ("McGregorWwww/UCTransNet", "493bd8136b2bb7265d7876104f56688363c8d0d1")
SRC_OCTSEG = ("ashkan-abbasi66/OCTseg-Zeiss", "ff1f3fec0ec813b9691924a84fc7c8a42b55deed")
SRC_PH2 = ("chelseaparlett/SkinCancerVariation", "e06866b70a49acfba5762f289ca169f056e97997")
SRC_BUSI = ("TongxinWang0405/BMI702_project", "922c9469dff20e816d3144880eadd28cdad8efa2")
SRC_POLYP = ("ViniciusSimm/Colo-Retal-Induscon2023", "f459d0c668838c383b5b09e2c89db4efa3cee03a")
SRC_NIIVUE = ("neurolabusc/niivue-images", "87579783591ae33603452ba48f1e20cc80a860f6")
SRC_HC18 = ("suraj7974/Tensorflow-Keras-UNET-model-for-Fetal-dataset",
            "e5b9e795112fbdc5923a315f69956c50ca9054fd")
SRC_OPENBREAST = ("spertuz/openbreast", "82510d16f597717aa8c939f11fd4f0f2ac3aac7e")
FILE_TABLE: dict[str, tuple[tuple[str, str], str, str]] = {
    "prad_brain1_img": (SRC_PYRADIOMICS, "data/brain1_image.nrrd",
        "fffdb111ee8b428ede7256707393c927a7d5be912f0604cf3c6f1bd5fc9644cf"),
    "prad_brain1_lbl": (SRC_PYRADIOMICS, "data/brain1_label.nrrd",
        "ae6d8e6b84f7e99d68c210ee2fa6aaaefa0b2df0a84f55efca4feebe2b216059"),
    "prad_brain2_img": (SRC_PYRADIOMICS, "data/brain2_image.nrrd",
        "d35a1c6a3e1eb72bae97c5515472fbe057fb38ee8e1e199215d1c3c6f292332e"),
    "prad_brain2_lbl": (SRC_PYRADIOMICS, "data/brain2_label.nrrd",
        "15189c024936ecc337649b9a10c475117c7c40df0d53c22163f9a2023ed741a5"),
    "prad_breast1_img": (SRC_PYRADIOMICS, "data/breast1_image.nrrd",
        "0e8b668f3ce9b9aacff20dc3c216866f43069ff96b269fb45b76f5e205a431e2"),
    "prad_breast1_lbl": (SRC_PYRADIOMICS, "data/breast1_label.nrrd",
        "07085bb0e36a956de5bd1c1c1b5f8bdf2ce80952125b13cbd352412c108c8950"),
    "prad_prostate_img": (SRC_PYRADIOMICS, "data/prostate_phantom_subvolume.nrrd",
        "4fb08fc0593a0e06d49bd8f7cb7cb6fc7ca68e9fc3cac0daa3ae26efa1516eba"),
    "prad_prostate_lbl": (SRC_PYRADIOMICS, "data/prostate_phantom_subvolume-label.nrrd",
        "6d6381cb6b227e996fed73b54239a177985681fd56a7c39a2e46e8d471727b22"),
    "ts_ct_img": (SRC_TOTALSEGMENTATOR, "tests/reference_files/example_ct_sm.nii.gz",
        "e50c00b2914e2cac0aaee8e7f3b5f57d44d9f21bfd5c0577271c54c0cb49e9fb"),
    "ts_ct_lbl": (SRC_TOTALSEGMENTATOR, "tests/reference_files/example_seg.nii.gz",
        "8be652475a4aaae83103a66bfb3345314b1fc06742807a06cf5005f7a7913a2d"),
    "ts_mr_img": (SRC_TOTALSEGMENTATOR, "tests/reference_files/example_mr_sm.nii.gz",
        "209b46efaff595dd54a9332872e17a722b62654bbb68dbd89acd5090701bbd4f"),
    "ts_mr_lbl": (SRC_TOTALSEGMENTATOR, "tests/reference_files/example_seg_mr.nii.gz",
        "e73a5ee12962aa2bb2f3e43ab58dfc67990c5a7ef2dcb426a1bf5e5982b9587f"),
    "drive21_img": (SRC_RETINA_UNET, "DRIVE/training/images/21_training.tif",
        "e7af55375ba088ac63db120377eaf94b2405fe80b7874d6e1d236cda4f8c4c83"),
    "drive21_lbl": (SRC_RETINA_UNET, "DRIVE/training/1st_manual/21_manual1.gif",
        "8b91ecd3ad91b3d7111f8f22e29913eb69502f8bfd4a1339db6508d73f52b8bb"),
    "drive22_img": (SRC_RETINA_UNET, "DRIVE/training/images/22_training.tif",
        "4fc9bd6642ab205174d4609c10836b2831f3f8aefa5febac1f136273ae4eebd6"),
    "drive22_lbl": (SRC_RETINA_UNET, "DRIVE/training/1st_manual/22_manual1.gif",
        "3e24a5eab43676e8f9a7149984e4c7477f3b3829c4a5241d733eb43719e67967"),
    "drive23_img": (SRC_RETINA_UNET, "DRIVE/training/images/23_training.tif",
        "4d20167c45d4e495bf1aac435c7f611a991fafdbcba8f39f5b2e667f3809c64b"),
    "drive23_lbl": (SRC_RETINA_UNET, "DRIVE/training/1st_manual/23_manual1.gif",
        "f9fc8da936de5e21effbd66b76f33ea6c529661ad8c49b4314c6a89d907461a0"),
    "drive24_img": (SRC_RETINA_UNET, "DRIVE/training/images/24_training.tif",
        "081db8928e07c9a222b05596f54f60770f37c1cdb39308377b420dc58a49c361"),
    "drive24_lbl": (SRC_RETINA_UNET, "DRIVE/training/1st_manual/24_manual1.gif",
        "ed400fb8471f272ad5e9d2693336cbedb7c437e299b918edeae8498d07c647fb"),
    "drive25_img": (SRC_RETINA_UNET, "DRIVE/training/images/25_training.tif",
        "544904428f4286cfde44f2f24171c59f1fbc86c00833a4862f31f7eba3c71841"),
    "drive25_lbl": (SRC_RETINA_UNET, "DRIVE/training/1st_manual/25_manual1.gif",
        "64410317c2f901643da575c7871dc972c9585220466cd81545d30ced922d5159"),
    "cxr1_img": (SRC_OPENIST, "Datasets/Chest_x-ray/1-10-500-500-100.jpg",
        "fc73238b1ab745e7a120f8e5585549e73bc1d00f1b77a37bdaff1bcde000f89b"),
    "cxr1_lbl": (SRC_OPENIST, "Datasets/Chest_x-ray/1-10-500-500-100@.png",
        "6ef521976d25b41aaa9a1ac179817bc10999a5a382b98d463e930953a252fe95"),
    "cxr10_img": (SRC_OPENIST, "Datasets/Chest_x-ray/10-19-500-500-100.jpg",
        "c79711894063674ae220eb677f8cb911a39559832615a096168f0cf11db78923"),
    "cxr10_lbl": (SRC_OPENIST, "Datasets/Chest_x-ray/10-19-500-500-100@.png",
        "5ac89975b1a2274c56cd5f2f418ef36a3926529492a3e52bf21c34c5ccdd6d62"),
    "cxr11_img": (SRC_OPENIST, "Datasets/Chest_x-ray/11-20-500-500-100.jpg",
        "732facc52069880ff308d53da3f7d3bb5129c14b1b45acf67e3f17331f2b5510"),
    "cxr11_lbl": (SRC_OPENIST, "Datasets/Chest_x-ray/11-20-500-500-100@.png",
        "f8c2088fdab453e8f56545f8f10520b98e2ec560a566d0f9c50c7f54d92eff0f"),
    "cxr12_img": (SRC_OPENIST, "Datasets/Chest_x-ray/12-21-500-500-100.jpg",
        "181fb772ca33804457918890eae1ed818f805be330d6ba493f2b8d68cb33de29"),
    "cxr12_lbl": (SRC_OPENIST, "Datasets/Chest_x-ray/12-21-500-500-100@.png",
        "fdcd4282477955f8961f26136f8e320d14cec51c2f7a76961024f607b51ff891"),
    "monuseg1_img": (SRC_UCTRANSNET, "datasets/MoNuSeg/Train_Folder/img/TCGA-21-5784-01Z-00-DX1.png",
        "1974752c4b5d3ab34bf3656b7d03f5907d26056be7a576b4f0353d996357187c"),
    "monuseg1_lbl": (SRC_UCTRANSNET, "datasets/MoNuSeg/Train_Folder/labelcol/TCGA-21-5784-01Z-00-DX1.png",
        "8a02dcad4ea7576e04ef0bbed1f4e5e77f4778d18799e97d3cf85593adb25033"),
    "monuseg2_img": (SRC_UCTRANSNET, "datasets/MoNuSeg/Train_Folder/img/TCGA-A7-A13E-01Z-00-DX1.png",
        "e78097309c943d07e0cb9fae66dfdca09daa45982249f999631efc3072c4be09"),
    "monuseg2_lbl": (SRC_UCTRANSNET, "datasets/MoNuSeg/Train_Folder/labelcol/TCGA-A7-A13E-01Z-00-DX1.png",
        "6ba453ca4ac95220a1bcbd709572c8e48db61f0eb4d563f1d21e35baa1011acd"),
    "monuseg3_img": (SRC_UCTRANSNET, "datasets/MoNuSeg/Train_Folder/img/TCGA-G9-6336-01Z-00-DX1.png",
        "2a0ef0da6497eee6e9066a2005a937e8023d21de4644fea104f4ec2bb5702f4a"),
    "monuseg3_lbl": (SRC_UCTRANSNET, "datasets/MoNuSeg/Train_Folder/labelcol/TCGA-G9-6336-01Z-00-DX1.png",
        "b06ced9edf4afdf97117b6dd23b7da762f078d82fabb811020b5a5cdd0f77892"),
    "oct1_img": (SRC_OCTSEG, "my-example-datasets/onh-3subsets/train/img/im00001.png",
        "840abd0a76ed6b310067c4668e783c986c7a725a3e0fa20ba2805e3ab3d51282"),
    "oct1_lbl": (SRC_OCTSEG, "my-example-datasets/onh-3subsets/train/mask/im00001.png",
        "59a33e3c090a339bc9fef72081dc866a879bb1f37dbff00933994d178afcacb9"),
    "oct2_img": (SRC_OCTSEG, "my-example-datasets/onh-3subsets/eval/img/im1111.png",
        "c741d9f1192e6dcf10957ad52465632c4dc1c9f10ce7e32e5215ffbb2af21ee0"),
    "oct2_lbl": (SRC_OCTSEG, "my-example-datasets/onh-3subsets/eval/mask/im1111.png",
        "10ae0b4431b0617bb27a4a92a993fb94bd3fd9d8795664efdaac649e50764ffe"),
    "oct3_img": (SRC_OCTSEG, "my-example-datasets/onh-3subsets/test/img/im0100.png",
        "c4e1d9af3a85092877a6a1e26a614c6e1115bdaa83d77dac54bb6ad04a24bc39"),
    "oct3_lbl": (SRC_OCTSEG, "my-example-datasets/onh-3subsets/test/mask/im0100.png",
        "dbcf616b964111bfa7d23b4c2a91597745ff02a877aa164daa3571fd36d0a64a"),
    "oct4_img": (SRC_OCTSEG, "my-example-datasets/onh-3subsets/predict/img/im1000.bmp",
        "375a8064a2b7628fa17753e9e223118443bc05419d8cc0f7364df724b89773f5"),
    "ph2_IMD002_img": (SRC_PH2, "PH2Dataset/PH2 Dataset images/IMD002/IMD002_Dermoscopic_Image/IMD002.bmp",
        "5ee4896451a1baba95f866973c6a78fc31d7806b1261d1c40ba75567cc9898a0"),
    "ph2_IMD002_lbl": (SRC_PH2, "PH2Dataset/PH2 Dataset images/IMD002/IMD002_lesion/IMD002_lesion.bmp",
        "8f8beca6ce3a93c8a43c19e98a45c929a4d392f15b88b5860207143ab716e1a4"),
    "ph2_IMD003_img": (SRC_PH2, "PH2Dataset/PH2 Dataset images/IMD003/IMD003_Dermoscopic_Image/IMD003.bmp",
        "7a833ba5bd404646a11a677ac6ed6925732b8197c2ea74e6b0861f9bc12bb5b3"),
    "ph2_IMD003_lbl": (SRC_PH2, "PH2Dataset/PH2 Dataset images/IMD003/IMD003_lesion/IMD003_lesion.bmp",
        "ea51b584dbe3b59aa57bbdc9680a829a9078bc05d8a3f326f91e0e0244e66294"),
    "ph2_IMD004_img": (SRC_PH2, "PH2Dataset/PH2 Dataset images/IMD004/IMD004_Dermoscopic_Image/IMD004.bmp",
        "9ed49d1865b6cb5ee5bfbedf8d7155bfb95c2918e2912b3312079fbdb74d4a2d"),
    "ph2_IMD004_lbl": (SRC_PH2, "PH2Dataset/PH2 Dataset images/IMD004/IMD004_lesion/IMD004_lesion.bmp",
        "8e2561ff5f4a2e166931ba58cba8254c14cd418fb9be60a6bfb374947a8a400a"),
    "ph2_IMD006_img": (SRC_PH2, "PH2Dataset/PH2 Dataset images/IMD006/IMD006_Dermoscopic_Image/IMD006.bmp",
        "84c10feacaa2e5581496493872b8a8c436d2da2b32e3d8f9a37763cd8aee24c6"),
    "ph2_IMD006_lbl": (SRC_PH2, "PH2Dataset/PH2 Dataset images/IMD006/IMD006_lesion/IMD006_lesion.bmp",
        "db468c5361e18ebd7ed7d1e9183b8a06cbb1c5cc8922b643ef7883c229131f7a"),
    "busi_benign1_img": (SRC_BUSI, "Dataset_BUSI_with_GT/benign/benign (1).png",
        "7822b1604210b5484716c5a2ea343abb1e60b95c9b580acf6de3aafa75043d56"),
    "busi_benign2_img": (SRC_BUSI, "Dataset_BUSI_with_GT/benign/benign (2).png",
        "8a9138d19e6e42f2d2a6d674bbee4197176e7984e81a911f51535b6835c28946"),
    "busi_malignant1_img": (SRC_BUSI, "Dataset_BUSI_with_GT/malignant/malignant (1).png",
        "5aaa398ca902323e29cdcd734b3c59f04df8ab1df5b2fae0d9aaad3686c41fd9"),
    "busi_malignant2_img": (SRC_BUSI, "Dataset_BUSI_with_GT/malignant/malignant (2).png",
        "54dfb23277413e3bad78ec48de56571169309bd0d90d0d1829531786ae15ed20"),
    "kvasir1_img": (SRC_POLYP, "datasets/Kvasir-SEG/images/cju0qkwl35piu0993l0dewei2.jpg",
        "db3b999d29785aee9eeeebe2a7b666d59a0036c05568f4df12a89ba7d04a2c82"),
    "kvasir1_lbl": (SRC_POLYP, "datasets/Kvasir-SEG/masks/cju0qkwl35piu0993l0dewei2.jpg",
        "4b644ef3bf028169cc0af619ef09206309202c4bab188c9ca082617932a4d4de"),
    "kvasir2_img": (SRC_POLYP, "datasets/Kvasir-SEG/images/cju0qoxqj9q6s0835b43399p4.jpg",
        "347f6833bcf1baad133db1f65805395c4adee176bb14b19948daa133fc1edf3e"),
    "kvasir2_lbl": (SRC_POLYP, "datasets/Kvasir-SEG/masks/cju0qoxqj9q6s0835b43399p4.jpg",
        "769deab9818196ca744fbb064cfaacb717eef5e3e8b7a520522b328d9f044892"),
    "kvasir3_img": (SRC_POLYP, "datasets/Kvasir-SEG/images/cju0qx73cjw570799j4n5cjze.jpg",
        "93ff1b49c2cfafcfdb4b50ade9beae3e6e48defbe1eba9fa68a0c73a1566fac3"),
    "kvasir3_lbl": (SRC_POLYP, "datasets/Kvasir-SEG/masks/cju0qx73cjw570799j4n5cjze.jpg",
        "46dc4ac8976374678b7740b478692e6751b3fe13fed42f59d7194cc4d959bfd5"),
    "kvasir4_img": (SRC_POLYP, "datasets/Kvasir-SEG/images/cju0roawvklrq0799vmjorwfv.jpg",
        "154b77daebe573ae3d1714db0b7280f78018d9035cadef4d9dd8cc313d04f00a"),
    "kvasir4_lbl": (SRC_POLYP, "datasets/Kvasir-SEG/masks/cju0roawvklrq0799vmjorwfv.jpg",
        "337d8126540f42dfbeff7c91ebde7e60530db69494d4a39c3bd60fa720180701"),
    "cvc1_img": (SRC_POLYP, "datasets/CVC-ClinicDB/images/1.jpg",
        "096b821124d42361e7c91851c80889e24c6af855935af56f073119f471ec5c3a"),
    "cvc1_lbl": (SRC_POLYP, "datasets/CVC-ClinicDB/masks/1.jpg",
        "ef467ae4eefeea59df81169c7f7376a9cbfa8ac255250770cb612e13c8e7b7e9"),
    "cvc100_img": (SRC_POLYP, "datasets/CVC-ClinicDB/images/100.jpg",
        "f2a91430bffa6898bb796989ec127ebe71c48e11823b1f98ec25be30e5075268"),
    "cvc100_lbl": (SRC_POLYP, "datasets/CVC-ClinicDB/masks/100.jpg",
        "4308cb9b9a746075e3267ca374479db677db15add9dfcef14f5a2da3d064df73"),
    "niivue_CT_AVM": (SRC_NIIVUE, "CT_AVM.nii.gz",
        "f91976458e16f3c3392dffd9504435d553c6af58bf033e7047579212f2f58f32"),
    "niivue_CT_pitch": (SRC_NIIVUE, "CT_pitch.nii.gz",
        "c99658c4b878383f39920075db4350d65b46247b950d187678b3fd4bf7420025"),
    "niivue_MR_Gd": (SRC_NIIVUE, "MR_Gd.nii.gz",
        "65cf8cff601a428be887483a06e422fa1d879246cc6fa50a04abd7d60b437b8c"),
    "ts_aorta_ct_cropped": (SRC_TOTALSEGMENTATOR,
                            "tests/reference_files/aorta_report/test_result/models/ct_cropped.nii.gz",
        "f776ecfa1326e7e21a8c30e5530f517c16f16a59a68fc06e8119cefc7c3b87a0"),
    "ts_aorta_aorta": (SRC_TOTALSEGMENTATOR, "tests/reference_files/aorta_report/test_result/models/aorta.nii.gz",
        "7fa1b813c63abcbe455b62a510c5e7a00fe0998f30541d5a8af46b20a88dd7f7"),
    "ts_aorta_brachiocephalic_trunk": (SRC_TOTALSEGMENTATOR,
                                       "tests/reference_files/aorta_report/test_result/models/brachiocephalic_trunk.nii.gz",
        "76ce8a3b3e9aeea03c88a358d9c6ceeb66e2fd6fbae33398a4ae4a8596e99661"),
    "ts_aorta_celiac_trunk": (SRC_TOTALSEGMENTATOR,
                              "tests/reference_files/aorta_report/test_result/models/celiac_trunk.nii.gz",
        "b7a962f0bac6f7dc6229ce5fd87be53741a4527a8b53df64a0f7b49f96370bcf"),
    "ts_aorta_common_carotid_artery_left": (SRC_TOTALSEGMENTATOR,
                                            "tests/reference_files/aorta_report/test_result/models/common_carotid_artery_left.nii.gz",
        "d878d1bb6dd9fe999c6523e4b705f99a1e99b6f77f910edcc9d5d06384a4da9b"),
    "ts_aorta_subclavian_artery_left": (SRC_TOTALSEGMENTATOR,
                                        "tests/reference_files/aorta_report/test_result/models/subclavian_artery_left.nii.gz",
        "993695ad2e9833fd3346bedc8e31635d4084c6b8e853620870fb52e41958be9a"),
    "ts_aorta_superior_mesenteric_artery": (SRC_TOTALSEGMENTATOR,
                                            "tests/reference_files/aorta_report/test_result/models/superior_mesenteric_artery.nii.gz",
        "ef688fff60982fdf97f6d558a6acb140fd0d7f30ca5333f72edb86e955954d28"),
    "ts_aorta_vertebrae_T12": (SRC_TOTALSEGMENTATOR,
                               "tests/reference_files/aorta_report/test_result/models/vertebrae_T12.nii.gz",
        "7baada974082529dc6c1f39bee3ef0b4e384ad020c0b7c1d3971d69e9576e0af"),
    "ts_pulm_ct_cropped": (SRC_TOTALSEGMENTATOR, "tests/reference_files/pulmonary_report/models/ct_cropped.nii.gz",
        "4da078fe43c9aa4d358903ac95105cea4fbe93b029474e4701bdde4db72126eb"),
    "ts_pulm_pulmonary_artery": (SRC_TOTALSEGMENTATOR,
                                 "tests/reference_files/pulmonary_report/models/pulmonary_artery.nii.gz",
        "b227c99939d441d52b9e9d975934f479f0c7e6388095ca719e5eb57e43f2ba2d"),
    "hc18_000_img": (SRC_HC18, "training_set/000_HC.png",
        "c530210f08e49a7e348075b59b90008586a856271bb472061ab043b1ba2a3715"),
    "hc18_000_lbl": (SRC_HC18, "training_set/000_HC_Annotation.png",
        "22da8fb98960fc7327cce858ed8bc7cd5aacbae919f99ec3b67e1d01f4b6efb3"),
    "hc18_001_img": (SRC_HC18, "training_set/001_HC.png",
        "f468235ce4a2a778d5340c550e18fc2de6b50936a19cadac3679d075654e5b2f"),
    "hc18_001_lbl": (SRC_HC18, "training_set/001_HC_Annotation.png",
        "96c37a50d592ce7d1d52a1c67a69294046836b0e97026a6f90ab88889b4df92e"),
    "hc18_002_img": (SRC_HC18, "training_set/002_HC.png",
        "8e36c719bb63b0920c1b2c16021178b301f4df3b6fc8f9a986d980919f824b1a"),
    "hc18_002_lbl": (SRC_HC18, "training_set/002_HC_Annotation.png",
        "df5c0dfc9b62f57f3b066d60b674e425d72054950a332a67c52c4e164328ad24"),
    "hc18_003_img": (SRC_HC18, "training_set/003_HC.png",
        "5a2f75b479646dbf3618ee5bd7561a5acbbef7c54d268e73c532881591dc011b"),
    "hc18_003_lbl": (SRC_HC18, "training_set/003_HC_Annotation.png",
        "a634596f56e091bac370158b8017346e40bd38c1dafc9367a8e72fd6e7ece623"),
    "bcdr_251_334_LO": (SRC_OPENBREAST, "samples/img_251_334_1_LO.tif",
        "5a20568c139b57b4696d4ad86255a2cc331809041ce67fe1a043705b95192ea0"),
}
# key → (repo, commit, path, sha256)
FILES: dict[str, tuple[str, str, str, str]] = {
    k: (src[0], src[1], path, sha) for k, (src, path, sha) in FILE_TABLE.items()}

LICENCES: dict[str, str] = {  # repository licence; data terms; what the labels are
    "AIM-Harvard/pyradiomics": "repo BSD-3-Clause; test images (brain MR, breast MR, prostate "
                               "phantom MR) shipped as pyradiomics test data; tumour/ROI labels",
    "wasserth/TotalSegmentator": "repo Apache-2.0; CT/MR test images; labels are TotalSegmentator "
                                 "model predictions (pseudo-labels), not manual",
    "orobix/retina-unet": "no licence file; DRIVE data: research use, cite Staal et al. 2004; "
                          "manual vessel masks",
    "pi-null-mezon/OpenIST": "no licence file; images from chestx-ray.com teaching module, "
                             "licence unknown; lung masks from the repo (origin not stated)",
    "McGregorWwww/UCTransNet": "no licence file; MoNuSeg data CC BY-NC-SA 4.0; manual nuclei masks",
    "ashkan-abbasi66/OCTseg-Zeiss": "repo MIT; example B-scans from a proprietary set, shared only "
                                    "as examples in the repo; layer masks",
    "chelseaparlett/SkinCancerVariation": "no licence file; PH2 data: research use, cite Mendonca "
                                          "et al. 2013; manual lesion masks",
    "TongxinWang0405/BMI702_project": "no licence file; BUSI images (Al-Dhabyani et al. 2020); "
                                      "no masks in this copy",
    "ViniciusSimm/Colo-Retal-Induscon2023": "no licence file; Kvasir-SEG (Jha et al. 2020, research "
                                            "and education use) and CVC-ClinicDB (Bernal et al. "
                                            "2015, research use), resized to 256×256 by the repo; "
                                            "manual polyp masks",
    "suraj7974/Tensorflow-Keras-UNET-model-for-Fetal-dataset": "no licence file; HC18 data CC BY 4.0 "
                                                               "(van den Heuvel et al. 2018); "
                                                               "manual head ellipse outlines",
    "spertuz/openbreast": "repo BSD-2-Clause; sample FFDM image from BCDR (research use, cite "
                          "Lopez et al. 2012); no labels",
    "neurolabusc/niivue-images": "repo BSD-2-Clause; per-file sources in its README (CT_AVM from "
                                 "IbisNeuronav/PRISMDatabase, CT_pitch courtesy P. Morgan, MR_Gd "
                                 "from figshare); no labels",
}


# ---------------------------------------------------------------- cases ---------------------------
@dataclass
class Case:
    """One output case. `recipe` names the intensity mapping; `label` is None for unlabeled cases.

    2D `options`: "crop" (y0, x0, h, w) applied before anything else is measured; "value_map"
    {grey value: label} for masks that encode classes as grey levels; "fill_holes" for outline
    annotations."""
    name: str
    image: str
    label: str | list[str] | None  # one label map, or binary masks stacked as labels 1, 2, …
    recipe: str  # "ct" | "mr" (percentile) | "rgb" (2D colour/grey as is)
    label_map: dict[int, int] | None = None  # source label → kept label (None: keep all non-zero)
    mask_threshold: int | None = None  # 2D binary masks: foreground = value > threshold
    options: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return 3 if self.name.startswith("3D") else 2

    @property
    def modality(self) -> str:
        return self.name.split("_")[1]


CASES: list[Case] = [
    Case("3DBox_MR_pyradiomics_1", "prad_brain1_img", "prad_brain1_lbl", "mr"),
    Case("3DBox_MR_pyradiomics_2", "prad_brain2_img", "prad_brain2_lbl", "mr"),
    Case("3DBox_MR_pyradiomics_3", "prad_breast1_img", "prad_breast1_lbl", "mr"),
    Case("3DBox_MR_pyradiomics_4", "prad_prostate_img", "prad_prostate_lbl", "mr"),
    Case("3DBox_CT_totalseg_1", "ts_ct_img", "ts_ct_lbl", "ct"),
    Case("3DBox_CT_totalseg_2", "ts_aorta_ct_cropped",
         [f"ts_aorta_{n}" for n in ("aorta", "brachiocephalic_trunk", "celiac_trunk",
                                    "common_carotid_artery_left", "subclavian_artery_left",
                                    "superior_mesenteric_artery", "vertebrae_T12")], "ct"),
    Case("3DBox_CT_totalseg_3", "ts_pulm_ct_cropped", ["ts_pulm_pulmonary_artery"], "ct"),
    Case("3DBox_MR_totalseg_1", "ts_mr_img", "ts_mr_lbl", "mr"),
] + [
    Case(f"2DBox_Fundus_drive_{k}", f"drive{k}_img", f"drive{k}_lbl", "rgb", mask_threshold=127)
    for k in (21, 22, 23, 24, 25)
] + [
    Case(f"2DBox_XRay_openist_{i}", f"cxr{k}_img", f"cxr{k}_lbl", "rgb", mask_threshold=127)
    for i, k in enumerate((1, 10, 11, 12), 1)
] + [
    # MoNuSeg tiles are 1000×1000 with ~700 nuclei; a 384×384 crop keeps the object count < 255
    Case(f"2DBox_Microscopy_monuseg_{i}", f"monuseg{i}_img", f"monuseg{i}_lbl", "rgb",
         mask_threshold=127, options={"crop": (300, 300, 384, 384)})
    for i in (1, 2, 3)
] + [
    # retinal layer masks: the 8 layers are grey values 0, 30, …, 210; 240 is background
    Case(f"2DBox_OCT_octsegzeiss_{i}", f"oct{i}_img", f"oct{i}_lbl", "rgb",
         options={"value_map": {30 * k: k + 1 for k in range(8)}})
    for i in (1, 2, 3)
] + [
    Case(f"2DBox_Dermoscopy_ph2_{i}", f"ph2_{n}_img", f"ph2_{n}_lbl", "rgb", mask_threshold=127)
    for i, n in enumerate(("IMD002", "IMD003", "IMD004", "IMD006"), 1)
] + [
    Case(f"2DBox_Endoscopy_kvasir_{i}", f"kvasir{i}_img", f"kvasir{i}_lbl", "rgb", mask_threshold=127)
    for i in (1, 2, 3, 4)
] + [
    Case(f"2DBox_Endoscopy_cvcclinicdb_{i}", f"cvc{n}_img", f"cvc{n}_lbl", "rgb", mask_threshold=127)
    for i, n in enumerate(("1", "100"), 1)
] + [
    # HC18 annotations are the head's ellipse outline; filled to a mask
    Case(f"2DBox_US_hc18_{i}", f"hc18_{k}_img", f"hc18_{k}_lbl", "rgb", mask_threshold=0,
         options={"fill_holes": True})
    for i, k in enumerate(("000", "001", "002", "003"), 1)
] + [
    # unlabeled: images only (distillation / calibration)
    Case("2DBox_OCT_octsegzeiss_4", "oct4_img", None, "rgb"),
] + [
    Case("2DBox_Mammography_bcdr_1", "bcdr_251_334_LO", None, "rgb"),
] + [
    Case(f"2DBox_US_busi_{i}", f"busi_{n}_img", None, "rgb")
    for i, n in enumerate(("benign1", "benign2", "malignant1", "malignant2"), 1)
] + [
    Case("3DBox_CT_niivue_1", "niivue_CT_AVM", None, "ct"),
    Case("3DBox_CT_niivue_2", "niivue_CT_pitch", None, "ct"),
    Case("3DBox_MR_niivue_1", "niivue_MR_Gd", None, "mr"),
]

# bundled with the project for the README demo: permissive-or-research data, all with gts, ≈2 MB
DEMO_CASES: list[str] = ["3DBox_CT_totalseg_1", "3DBox_MR_pyradiomics_1", "2DBox_Endoscopy_kvasir_1",
                         "2DBox_US_hc18_1", "2DBox_Microscopy_monuseg_1"]

MIN_OBJECT_PIXELS = 20       # smaller components are annotation specks, not promptable objects
MIN_OBJECT_FRACTION = 0.05   # of the largest component of the same source label
MAX_SIDE_3D = 256            # in-plane cap for committed 3D volumes (keeps the set ≲ 25 MB)
MAX_SIDE_2D = 1024           # longest-side cap for 2D images
Z_MARGIN = 5                 # slices kept either side of the labelled z-range
CT_WINDOW_HU = (-160.0, 240.0)
PERCENTILES = (0.5, 99.5)


# ---------------------------------------------------------------- raw file access -----------------
def git_dir(mirror_root: str, repo: str) -> str:
    """The bare git dir of a fetched snapshot of `repo` under mirror_root."""
    base = os.path.join(mirror_root, repo.replace("/", "+"))
    for cand in (os.path.join(base, "repo", ".git"), os.path.join(base, "repo"), base):
        if os.path.isfile(os.path.join(cand, "HEAD")):  # a git dir, bare or not
            return cand
    return base


def read_raw(key: str, mirror_root: str, check_hash: bool = True) -> bytes:
    """Bytes of the pinned file FILES[key], verified against its sha256."""
    repo, commit, path, sha = FILES[key]
    gd = git_dir(mirror_root, repo)
    try:
        data = subprocess.run(["git", "--git-dir", gd, "show", f"{commit}:{path}"],
                              check=True, capture_output=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        err = getattr(e, "stderr", b"") or b""
        raise SystemExit(f"{gd}: cannot read {commit[:10]}:{path} ({err.decode(errors='replace').strip()}); "
                         f"fetch {repo} first")
    digest = hashlib.sha256(data).hexdigest()
    if check_hash and sha and digest != sha:
        raise SystemExit(f"{repo}:{path}: sha256 {digest} != pinned {sha}")
    return data


# ---------------------------------------------------------------- readers -------------------------
_NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4",
                 1024: "i8", 1280: "u8"}
_NRRD_DTYPES = {"uchar": "u1", "unsigned char": "u1", "uint8": "u1", "uint8_t": "u1",
                "signed char": "i1", "int8": "i1", "int8_t": "i1", "char": "i1",
                "short": "i2", "short int": "i2", "signed short": "i2", "int16": "i2", "int16_t": "i2",
                "ushort": "u2", "unsigned short": "u2", "uint16": "u2", "uint16_t": "u2",
                "int": "i4", "signed int": "i4", "int32": "i4", "int32_t": "i4",
                "uint": "u4", "unsigned int": "u4", "uint32": "u4", "uint32_t": "u4",
                "float": "f4", "double": "f8"}
_MHA_DTYPES = {"MET_UCHAR": "u1", "MET_CHAR": "i1", "MET_SHORT": "i2", "MET_USHORT": "u2",
               "MET_INT": "i4", "MET_UINT": "u4", "MET_FLOAT": "f4", "MET_DOUBLE": "f8"}


def read_nifti(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """NIfTI-1 (.nii / .nii.gz) → (array D×H×W as stored, z slowest; spacing_mm (x, y, z))."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    endian = "<" if np.frombuffer(data[:4], "<i4")[0] == 348 else ">"
    dims = np.frombuffer(data[40:56], endian + "i2")
    code = int(np.frombuffer(data[70:72], endian + "i2")[0])
    pixdim = np.frombuffer(data[76:108], endian + "f4")
    offset = int(np.frombuffer(data[108:112], endian + "f4")[0])
    slope, inter = np.frombuffer(data[112:120], endian + "f4")
    if code not in _NIFTI_DTYPES:
        raise ValueError(f"NIfTI datatype {code} not supported")
    shape = [int(d) for d in dims[1:1 + int(dims[0])]] + [1, 1]
    nx, ny, nz = shape[:3]
    dt = np.dtype(endian + _NIFTI_DTYPES[code])
    arr = np.frombuffer(data, dt, count=nx * ny * nz, offset=offset).reshape(nz, ny, nx)
    if slope not in (0.0, 1.0) or inter != 0.0:
        arr = arr * np.float32(slope if slope != 0 else 1.0) + np.float32(inter)
    return arr, np.abs(pixdim[1:4]).astype(np.float64)


def _text_header(data: bytes, end_marker: bytes) -> tuple[list[str], int]:
    i = data.index(end_marker)
    return data[:i].decode("latin-1").splitlines(), i + len(end_marker)


def read_nrrd(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """NRRD (attached data, raw or gzip) → (array D×H×W, spacing_mm (x, y, z))."""
    lines, start = _text_header(data, b"\n\n")
    fields = {}
    for ln in lines[1:]:
        if ln.startswith("#") or ":" not in ln:
            continue
        k, v = ln.split(":", 1)
        fields[k.strip().lower()] = v.lstrip("=").strip()
    sizes = [int(s) for s in fields["sizes"].split()]
    dt = np.dtype(("<" if fields.get("endian", "little") == "little" else ">")
                  + _NRRD_DTYPES[fields["type"].lower()])
    payload = data[start:]
    enc = fields.get("encoding", "raw").lower()
    if enc in ("gzip", "gz"):
        payload = gzip.decompress(payload)
    elif enc != "raw":
        raise ValueError(f"NRRD encoding {enc} not supported")
    arr = np.frombuffer(payload, dt, count=int(np.prod(sizes))).reshape(sizes[::-1])
    if "space directions" in fields:
        vecs = [v for v in fields["space directions"].replace(" ", "").split(")(")]
        spacing = [float(np.linalg.norm([float(x) for x in v.strip("()").split(",")])) for v in vecs
                   if v.strip("()") != "none"]
    else:
        spacing = [float(s) for s in fields.get("spacings", "1 1 1").split()]
    return arr, np.asarray(spacing, np.float64)


def read_mha(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """MetaImage .mha (ElementDataFile = LOCAL, optionally zlib-compressed) → (D×H×W, spacing_mm)."""
    marker = data.index(b"ElementDataFile")
    start = data.index(b"\n", marker) + 1
    fields = {}
    for ln in data[:start].decode("latin-1").splitlines():
        if "=" in ln:
            k, v = ln.split("=", 1)
            fields[k.strip()] = v.strip()
    sizes = [int(s) for s in fields["DimSize"].split()]
    msb = fields.get("BinaryDataByteOrderMSB", fields.get("ElementByteOrderMSB", "False")) == "True"
    dt = np.dtype((">" if msb else "<") + _MHA_DTYPES[fields["ElementType"]])
    payload = data[start:]
    if fields.get("CompressedData", "False") == "True":
        payload = zlib.decompress(payload)
    arr = np.frombuffer(payload, dt, count=int(np.prod(sizes))).reshape(sizes[::-1])
    spacing = [float(s) for s in fields.get("ElementSpacing", "1 1 1").split()]
    return arr, np.asarray(spacing, np.float64)


def read_volume(data: bytes, path: str) -> tuple[np.ndarray, np.ndarray]:
    """Dispatch on the file name: .nii(.gz) / .nrrd / .mha → (D×H×W array, spacing_mm (x, y, z))."""
    p = path.lower()
    if p.endswith((".nii", ".nii.gz")):
        return read_nifti(data)
    if p.endswith(".nrrd"):
        return read_nrrd(data)
    if p.endswith(".mha"):
        return read_mha(data)
    raise ValueError(f"{path}: no volume reader for this extension")


def read_image2d(data: bytes, path: str) -> np.ndarray:
    """PNG/JPG/TIFF/GIF/BMP/PGM bytes → H×W or H×W×3 (RGB order) array, dtype as stored."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError(f"{path}: OpenCV cannot decode this image")
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.ndim == 3:
        arr = arr[:, :, ::-1]  # OpenCV decodes BGR
    return np.ascontiguousarray(arr)


# ---------------------------------------------------------------- conversion ----------------------
def to_uint8(arr: np.ndarray, recipe: str) -> np.ndarray:
    """Intensities → uint8 0..255: "ct" soft-tissue window; "mr" (also PET) 0.5–99.5 percentile
    min-max; "rgb" keeps uint8 images as they are and min-max scales anything deeper (16-bit PNG)."""
    if recipe == "rgb" and arr.dtype == np.uint8:
        return arr
    a = np.asarray(arr, np.float32)
    if recipe == "ct":
        lo, hi = CT_WINDOW_HU
    elif recipe in ("mr", "pet"):
        lo, hi = (float(v) for v in np.percentile(a, PERCENTILES))
    elif recipe == "rgb":
        lo, hi = float(a.min()), float(a.max())
    else:
        raise ValueError(f"unknown intensity recipe {recipe!r}")
    out = (np.clip(a, lo, hi) - lo) / max(hi - lo, 1e-6) * 255.0
    return np.round(out).astype(np.uint8)


def split_objects(labels: np.ndarray, label_map: dict[int, int] | None = None
                  ) -> tuple[np.ndarray, list[tuple[slice, ...]]]:
    """Source label map (2D or 3D ints) → (uint8 map with one label per kept connected object,
    bounding slices of object i at index i-1). Order: source label ascending, then component size."""
    out = np.zeros(labels.shape, np.uint8)
    bounds: list[tuple[slice, ...]] = []
    values = [v for v in np.unique(labels) if v != 0]
    if label_map is not None:
        values = [v for v in values if int(v) in label_map]
    structure = np.ones((3,) * labels.ndim, bool)  # 8-/26-connectivity
    for v in values:
        comp, n = ndimage.label(labels == v, structure=structure)
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel())[1:]
        keep = [i + 1 for i in np.argsort(-sizes)
                if sizes[i] >= MIN_OBJECT_PIXELS and sizes[i] >= MIN_OBJECT_FRACTION * sizes.max()]
        slices = ndimage.find_objects(comp)
        for c in keep:
            if len(bounds) == 255:
                raise ValueError("more than 255 objects; uint8 gts cannot hold them")
            bounds.append(slices[c - 1])
            out[comp == c] = len(bounds)
    return out, bounds


def boxes_from_bounds(bounds: list[tuple[slice, ...]]) -> np.ndarray:
    """Object bounding slices → inclusive boxes: 2D (x0, y0, x1, y1), 3D (x0, y0, z0, x1, y1, z1)."""
    rows = []
    for b in bounds:
        if len(b) == 2:
            y, x = b
            rows.append([x.start, y.start, x.stop - 1, y.stop - 1])
        else:
            z, y, x = b
            rows.append([x.start, y.start, z.start, x.stop - 1, y.stop - 1, z.stop - 1])
    ncol = 4 if not bounds or len(bounds[0]) == 2 else 6
    return np.asarray(rows, np.int64).reshape(-1, ncol)


def resize_volume(vol: np.ndarray, hw: tuple[int, int], nearest: bool) -> np.ndarray:
    """Resize each slice of a D×H×W volume to hw (area for images, nearest for labels)."""
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    src = vol if nearest else vol.astype(np.float32)
    if nearest and vol.dtype not in (np.uint8, np.uint16, np.int16, np.float32):
        src = vol.astype(np.int32).astype(np.float32)  # cv2 nearest needs a supported dtype
    out = np.stack([cv2.resize(s, (hw[1], hw[0]), interpolation=interp) for s in src])
    return out.astype(vol.dtype) if nearest else out


def capped_hw(hw: tuple[int, int], max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(hw))
    return max(1, int(round(hw[0] * scale))), max(1, int(round(hw[1] * scale)))


def build_3d(case: Case, mirror_root: str) -> dict:
    """Volume (+ labels) → arrays of one 3D case: crop z to labels ± Z_MARGIN, cap in-plane size."""
    img, spacing = read_volume(read_raw(case.image, mirror_root), FILES[case.image][2])
    lbl = None
    if case.label:
        keys = [case.label] if isinstance(case.label, str) else case.label
        for i, key in enumerate(keys, 1):
            part, _ = read_volume(read_raw(key, mirror_root), FILES[key][2])
            if part.shape != img.shape:
                raise SystemExit(f"{case.name}: {FILES[key][2]} shape {part.shape} != image {img.shape}")
            part = np.asarray(part).astype(np.int32)
            if len(keys) > 1:  # a stack of binary masks: mask i becomes label i (later masks win)
                lbl = np.zeros(img.shape, np.int32) if lbl is None else lbl
                lbl[part > 0] = i
            else:
                lbl = part
        if case.label_map is not None:
            lbl = np.where(np.isin(lbl, list(case.label_map)), lbl, 0)
        zs = np.flatnonzero(lbl.reshape(lbl.shape[0], -1).any(1))
        if zs.size == 0:
            raise SystemExit(f"{case.name}: label volume is empty")
        z0, z1 = max(0, zs[0] - Z_MARGIN), min(img.shape[0], zs[-1] + 1 + Z_MARGIN)
        img, lbl = img[z0:z1], lbl[z0:z1]
    imgs = to_uint8(img, case.recipe)  # window/percentiles on the cropped volume, at full resolution
    hw = capped_hw(imgs.shape[1:], MAX_SIDE_3D)
    spacing = spacing.copy()
    if hw != imgs.shape[1:]:
        spacing[0] *= imgs.shape[2] / hw[1]
        spacing[1] *= imgs.shape[1] / hw[0]
        imgs = np.clip(np.round(resize_volume(imgs, hw, nearest=False)), 0, 255).astype(np.uint8)
        if lbl is not None:
            lbl = resize_volume(lbl, hw, nearest=True)
    out = {"imgs": np.ascontiguousarray(imgs), "spacing": spacing.astype(np.float64)}
    if lbl is not None:
        gts, bounds = split_objects(lbl)
        out["gts"], out["boxes"] = gts, boxes_from_bounds(bounds)
    return out


def build_2d(case: Case, mirror_root: str) -> dict:
    """Image (+ mask or label image) → arrays of one 2D case, longest side capped at MAX_SIDE_2D."""
    img = read_image2d(read_raw(case.image, mirror_root), FILES[case.image][2])
    img = to_uint8(img, case.recipe)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    lbl = None
    if case.label:
        lbl = read_image2d(read_raw(case.label, mirror_root), FILES[case.label][2])
        if lbl.ndim == 3:
            lbl = lbl.max(axis=2)  # masks stored as RGB/grey copies: any channel marks foreground
        if lbl.shape != img.shape[:2]:
            raise SystemExit(f"{case.name}: mask {lbl.shape} != image {img.shape[:2]}")
        if case.mask_threshold is not None:
            lbl = (lbl > case.mask_threshold).astype(np.int32)
        if case.options.get("fill_holes"):  # outline annotations (HC18 ellipses) → filled masks
            lbl = ndimage.binary_fill_holes(lbl > 0).astype(np.int32)
        if "value_map" in case.options:  # grey value → label; unlisted values are background
            src_vals = lbl
            lbl = np.zeros(src_vals.shape, np.int32)
            for value, label in case.options["value_map"].items():
                lbl[src_vals == value] = label
    if "crop" in case.options:
        y0, x0, h, w = case.options["crop"]
        img = img[y0:y0 + h, x0:x0 + w]
        lbl = None if lbl is None else lbl[y0:y0 + h, x0:x0 + w]
    hw = capped_hw(img.shape[:2], MAX_SIDE_2D)
    if hw != img.shape[:2]:
        img = cv2.resize(img, (hw[1], hw[0]), interpolation=cv2.INTER_AREA)
        if lbl is not None:
            lbl = cv2.resize(lbl.astype(np.uint8), (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)
    out = {"imgs": np.ascontiguousarray(img.astype(np.uint8))}
    if lbl is not None:
        gts, bounds = split_objects(np.asarray(lbl), case.label_map)
        out["gts"], out["boxes"] = gts, boxes_from_bounds(bounds)
    return out


def check_case(name: str, arrays: dict) -> None:
    """Challenge-format invariants, checked before anything is written: uint8 images of the right
    rank, labels 1..N present exactly once each as boxes, each box the tight bound of its label."""
    imgs = arrays["imgs"]
    dim = 3 if name.startswith("3D") else 2
    ok_shape = imgs.ndim == 3 and (dim == 3 or imgs.shape[2] == 3)
    if imgs.dtype != np.uint8 or not ok_shape:
        raise SystemExit(f"{name}: imgs {imgs.shape} {imgs.dtype} is not challenge format")
    if dim == 3 and arrays["spacing"].shape != (3,):
        raise SystemExit(f"{name}: spacing must have 3 values, got {arrays['spacing']}")
    if "gts" not in arrays:
        return
    gts, boxes = arrays["gts"], arrays["boxes"]
    if gts.shape != imgs.shape[:gts.ndim] or gts.dtype != np.uint8:
        raise SystemExit(f"{name}: gts {gts.shape} {gts.dtype} does not match imgs {imgs.shape}")
    if len(boxes) == 0 or int(gts.max()) != len(boxes):
        raise SystemExit(f"{name}: {len(boxes)} boxes but labels up to {int(gts.max())}")
    for i, (box, sl) in enumerate(zip(boxes, ndimage.find_objects(gts)), 1):
        if sl is None or not np.array_equal(box, boxes_from_bounds([sl])[0]):
            raise SystemExit(f"{name}: box {i} {box.tolist()} is not the bound of label {i}")


# ---------------------------------------------------------------- writing -------------------------
def write_case(case: Case, arrays: dict, out_dir: str) -> None:
    """Labelled: imgs/ + gts/ (challenge layout); unlabelled: unlabeled/ (imgs, spacing)."""
    if "gts" in arrays:
        data.write_challenge_case(out_dir, case.name + ".npz", arrays)
    else:
        data.write_case(os.path.join(out_dir, "unlabeled", case.name + ".npz"), arrays, with_gts=False)


MANIFEST_FIELDS = ["name", "modality", "dim", "source_repo", "commit", "path", "sha256", "licence",
                   "labeled", "label_path", "label_sha256", "n_objects", "shape"]


def manifest_row(case: Case, arrays: dict, mirror_root: str) -> dict:
    repo, commit, path, sha = FILES[case.image]
    row = {"name": case.name, "modality": case.modality, "dim": f"{case.dim}D", "source_repo": repo,
           "commit": commit, "path": path, "sha256": sha or hashlib.sha256(
               read_raw(case.image, mirror_root)).hexdigest(),
           "licence": LICENCES.get(repo, "unknown"), "labeled": "yes" if case.label else "no",
           "label_path": "", "label_sha256": "", "n_objects": len(arrays.get("boxes", [])),
           "shape": "x".join(str(s) for s in arrays["imgs"].shape)}
    if case.label:
        keys = [case.label] if isinstance(case.label, str) else case.label
        row["label_path"] = ";".join(FILES[k][2] for k in keys)
        row["label_sha256"] = ";".join(FILES[k][3] for k in keys)
    return row


def main(argv: list[str] | None = None) -> int:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--mirror-root", default="/work/.mirror",
                    help="directory holding fetched snapshots as <owner>+<name>/repo bare git dirs")
    ap.add_argument("--out", default=os.path.join(here, "devset"), help="dev set output directory")
    ap.add_argument("--demo-out", default=os.path.join(here, "demo"),
                    help="where DEMO_CASES are copied (imgs/ and gts/)")
    ap.add_argument("--only", nargs="*", default=None, help="build only these case names")
    ap.add_argument("--print-hashes", action="store_true",
                    help="print sha256 of every pinned raw file (to fill FILES) and exit")
    args = ap.parse_args(argv)

    if args.print_hashes:
        for key in FILES:
            data = read_raw(key, args.mirror_root, check_hash=False)
            print(f"{key}\t{hashlib.sha256(data).hexdigest()}\t{len(data)}")
        return 0
    unpinned = [k for k, v in FILES.items() if not v[3]]
    if unpinned:
        print(f"warning: {len(unpinned)} raw files have no pinned sha256 yet: {unpinned[:3]}…",
              file=sys.stderr)

    unknown = sorted(set(args.only or ()) - {c.name for c in CASES})
    if unknown:
        raise SystemExit(f"--only: no such case(s): {', '.join(unknown)}")
    cases = [c for c in CASES if args.only is None or c.name in args.only]
    rows = []
    for case in cases:
        arrays = (build_3d if case.dim == 3 else build_2d)(case, args.mirror_root)
        check_case(case.name, arrays)
        write_case(case, arrays, args.out)
        rows.append(manifest_row(case, arrays, args.mirror_root))
        nobj = len(arrays.get("boxes", []))
        print(f"{case.name}: imgs {arrays['imgs'].shape}, {nobj} objects", file=sys.stderr)

    if args.only is None:
        tmp = os.path.join(args.out, "manifest.csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, os.path.join(args.out, "manifest.csv"))
        for name in DEMO_CASES:
            for sub in ("imgs", "gts"):
                os.makedirs(os.path.join(args.demo_out, sub), exist_ok=True)
                shutil.copyfile(os.path.join(args.out, sub, name + ".npz"),
                                os.path.join(args.demo_out, sub, name + ".npz"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
